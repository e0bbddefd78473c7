"""CIFAR-style models in our own code."""
