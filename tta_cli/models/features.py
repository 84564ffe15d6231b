"""What a backbone's trunk emits, so heads and self-supervised decoders can be built for any backbone."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    """kind "map": (B, channels, grid, grid); kind "tokens": (B, tokens, channels) with a
    leading class token when `has_cls`, the rest a grid x grid patch grid."""

    kind: str
    channels: int
    grid: int
    has_cls: bool = False


class GlobalPool(nn.Module):
    """Feature map -> (B, C) by average pooling; tokens -> class token (or mean of patches)."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.kind = spec.kind
        self.has_cls = spec.has_cls

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "map":
            return features.mean(dim=(2, 3))
        if self.has_cls:
            return features[:, 0]
        return features.mean(dim=1)


class LinearClassifier(nn.Sequential):
    """Pool + linear: the output layer of the main head and of the rotation head."""

    def __init__(self, spec: FeatureSpec, outputs: int):
        super().__init__(GlobalPool(spec), nn.Linear(spec.channels, outputs))


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's output pooled to one vector per image (B, D): the mean over the map's pixels, or over all tokens
    (class token included) for a ViT. The embedding the neighbour index and the adapted-weight cache are keyed by."""
    features = model.features(images)
    return features.mean(dim=(2, 3)) if features.dim() == 4 else features.mean(dim=1)
