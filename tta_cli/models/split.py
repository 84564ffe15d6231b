"""Cutting a torchvision-layout ResNet (stem, layer1..layer4) into TTT's Y shape: shared by the timm and the
torchvision families, whose modules carry the same layer names (only their stems differ)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

SPLITS = ("layer1", "layer2", "layer3")
LAYERS = ("layer1", "layer2", "layer3", "layer4")
SMALL_IMAGE = 64  # img_size at or below which the CIFAR-style stem is used


def split_resnet(main_model: nn.Module, ssl_model: nn.Module, stem: tuple[str, ...], split: str) -> tuple[nn.Sequential, ...]:
    """(encoder, main trunk, ssl trunk): the stem and layers up to `split` of `main_model`, its layers after the
    split, and the same layers of `ssl_model` (a fresh, independently initialised copy) for the ssl head."""
    cut = LAYERS.index(split) + 1
    encoder = nn.Sequential(OrderedDict((name, getattr(main_model, name)) for name in stem + LAYERS[:cut]))
    main_trunk = nn.Sequential(OrderedDict((name, getattr(main_model, name)) for name in LAYERS[cut:]))
    ssl_trunk = nn.Sequential(OrderedDict((name, getattr(ssl_model, name)) for name in LAYERS[cut:]))
    return encoder, main_trunk, ssl_trunk
