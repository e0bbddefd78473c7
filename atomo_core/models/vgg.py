"""VGG-11 with batch normalization for 32x32 inputs (Simonyan & Zisserman 2015), as in Section 6, Table 2.

Features: the VGG-11 configuration of 3x3 convs (with bias) each followed by BN and ReLU, and 2x2 max-pools;
five pools take 32x32 to 1x1 with 512 channels. Head: the 512-512-512-classes classifier of the original
ATOMO code, without dropout. 9,756,426 parameters for 10 classes and 3 input channels (Table 2: 9,756k).

`vgg11_bn_narrow`: the same layers at 5/16 of the width (20 to 160 channels, a 160-512-512-classes head), the
last pool adaptive so that 28x28 inputs work too: 1,252,978 parameters for 10 classes and 1 input channel, a
model of more than 1M parameters that trains on a few CPU cores in minutes (`atomo bench table6`).
"""

from __future__ import annotations

import torch
from torch import nn

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG11_NARROW = (20, "M", 40, "M", 80, 80, "M", 160, 160, "M", 160, 160, "A")  # "A": adaptive max-pool to 1x1


class VGG(nn.Module):
    def __init__(self, config=VGG11, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            elif item == "A":
                layers.append(nn.AdaptiveMaxPool2d(1))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG11, num_classes, in_channels)


def vgg11_bn_narrow(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG11_NARROW, num_classes, in_channels)
