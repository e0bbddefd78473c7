"""ResNet-18/34 for 32x32 inputs (He et al. 2016), as used in the paper's experiments (Section 6, Table 2).

The CIFAR variant: a 3x3 stem with 64 channels and no max-pool, four stages of BasicBlocks with 64, 128, 256,
512 channels (the last three halve the resolution), global average pooling and one linear layer.
ResNet-18 has 11,173,962 parameters for 10 classes and 3 input channels (Table 2: 11,173k).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (a 1x1 conv-BN when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with BasicBlocks; `blocks` gives the number of blocks per stage."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        in_planes = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            strides = [1 if i == 0 else 2] + [1] * (count - 1)
            layers = []
            for stride in strides:
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


def resnet34(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes, in_channels)
