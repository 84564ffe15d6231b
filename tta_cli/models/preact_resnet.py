"""The CIFAR pre-activation ResNet of the TTT paper (Sun et al. 2020): depth 6N+2, widths 16k/32k/64k,
GroupNorm (8 groups) or BatchNorm, split after layer1, layer2 or layer3."""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from tta_cli.config import ModelConfig
from tta_cli.errors import TTAError
from tta_cli.models.batchnorm import CleanStatsBatchNorm2d
from tta_cli.models.features import FeatureSpec
from tta_cli.models.registry import register

SPLITS = ("layer1", "layer2", "layer3")
STAGES = ("stem", "layer1", "layer2", "layer3", "final")


def norm_factory(kind: str, groups: int):
    if kind == "gn":
        return partial(nn.GroupNorm, groups)
    if kind == "bn":
        return CleanStatsBatchNorm2d
    raise TTAError(f"unknown norm {kind!r}; choose gn or bn")


class PreActBlock(nn.Module):
    """norm-relu-conv-norm-relu-conv on the residual branch; the shortcut stays un-normalised."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm):
        super().__init__()
        self.norm1 = norm(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.norm2 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = Downsample(in_planes, planes, stride) if stride != 1 or in_planes != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(norm_relu(self.norm1, x))
        residual = self.conv2(norm_relu(self.norm2, residual))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return shortcut + residual


class Downsample(nn.Module):
    """Parameter-free shortcut (the paper's): average-pool by the stride, zero-pad new channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        if planes % in_planes:
            raise TTAError(f"shortcut needs planes ({planes}) to be a multiple of in_planes ({in_planes})")
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = nn.functional.avg_pool2d(x, self.stride)
        return nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra))


class NormReLU(nn.Sequential):
    """The final pre-activation norm + ReLU, which ends each head's trunk."""

    def __init__(self, channels: int, norm):
        super().__init__(norm(channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_relu(self[0], x)


def norm_relu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(norm(x)), as one fused call where the norm offers one (triton_norm.TritonGroupNorm.forward_relu)."""
    fused = getattr(norm, "forward_relu", None)
    return torch.relu(norm(x)) if fused is None else fused(x)


def make_stage(in_planes: int, planes: int, blocks: int, stride: int, norm) -> nn.Sequential:
    layers = [PreActBlock(in_planes, planes, stride, norm)]
    layers += [PreActBlock(planes, planes, 1, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def build_stages(config: ModelConfig) -> list[tuple[str, nn.Module]]:
    """The whole network as named stages: stem, layer1..3, final norm."""
    if (config.depth - 2) % 6 or config.depth < 8:
        raise TTAError(f"preact_resnet depth must be 6N+2 (8, 14, 20, 26, ...), got {config.depth}")
    blocks = (config.depth - 2) // 6
    norm = norm_factory(config.norm, config.groups)
    widths = [16 * config.width, 32 * config.width, 64 * config.width]
    if config.norm == "gn" and any(w % config.groups for w in widths):
        raise TTAError(f"GroupNorm with {config.groups} groups needs channel counts {widths} divisible by it")
    stages = [
        ("stem", nn.Conv2d(3, 16, 3, 1, 1, bias=False)),
        ("layer1", make_stage(16, widths[0], blocks, 1, norm)),
        ("layer2", make_stage(widths[0], widths[1], blocks, 2, norm)),
        ("layer3", make_stage(widths[1], widths[2], blocks, 2, norm)),
        ("final", NormReLU(widths[2], norm)),
    ]
    for _, stage in stages:
        stage.apply(init_weights)
    return stages


def init_weights(module: nn.Module) -> None:
    """He-normal convolutions (fan-out, as the paper's code), unit-scale norms."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register("preact_resnet")
def build_preact_resnet(config: ModelConfig):
    if config.split not in SPLITS:
        raise TTAError(f"unknown split {config.split!r} for preact_resnet; choose one of: {', '.join(SPLITS)}")
    cut = STAGES.index(config.split) + 1
    main_stages = build_stages(config)
    ssl_stages = build_stages(config)  # a fresh, independently initialised copy of the layers after the split
    encoder = nn.Sequential(OrderedDict(main_stages[:cut]))
    main_trunk = nn.Sequential(OrderedDict(main_stages[cut:]))
    ssl_trunk = nn.Sequential(OrderedDict(ssl_stages[cut:]))
    spec = FeatureSpec("map", 64 * config.width, config.img_size // 4)
    return encoder, main_trunk, ssl_trunk, spec
