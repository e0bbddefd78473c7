"""VGG-11 with batch normalization for 32x32 inputs (Simonyan & Zisserman 2015), as in Section 6, Table 2.

Features: the VGG-11 configuration of 3x3 convs (with bias) each followed by BN and ReLU, and 2x2 max-pools;
five pools take 32x32 to 1x1 with 512 channels. Head: the 512-512-512-classes classifier of the original
ATOMO code, without dropout. 9,756,426 parameters for 10 classes and 3 input channels (Table 2: 9,756k).
"""

from __future__ import annotations

import torch
from torch import nn

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, config=VGG11, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG11, num_classes, in_channels)
