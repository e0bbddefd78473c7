"""CIFAR-style models in our own code: all take [N, in_channels, 32, 32] inputs and return [N, num_classes]."""

from __future__ import annotations

from torch import nn

from atomo_core.models.resnet import ResNet, resnet18, resnet34
from atomo_core.models.small import MLP, LeNet5
from atomo_core.models.vgg import VGG, vgg11_bn, vgg11_bn_narrow

_BUILDERS = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg11_bn": vgg11_bn,
    "vgg11_bn_narrow": vgg11_bn_narrow,
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A freshly initialised model; its weights depend only on the torch seed (`torch.manual_seed`)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be positive, got {num_classes} and {in_channels}")
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels)


__all__ = [
    "LeNet5",
    "MLP",
    "MODEL_NAMES",
    "ResNet",
    "VGG",
    "build_model",
    "resnet18",
    "resnet34",
    "vgg11_bn",
    "vgg11_bn_narrow",
]
