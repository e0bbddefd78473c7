"""Small models for quick runs on 32x32 inputs: a two-hidden-layer MLP and LeNet-5 (LeCun et al. 1998)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then two hidden layers of `hidden` ReLU units."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 256, image_size: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """conv 6@5x5, pool, conv 16@5x5, pool (32 -> 28 -> 14 -> 10 -> 5), fc 120, fc 84, fc classes; ReLU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
