"""The one in-memory form of every image source: decoded once, uint8, channels last."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """images: uint8 (N, H, W, 3); labels: int64 (N,); class_names in label order.

    `meta` carries source-specific facts (corruption, severity, path) for reports.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | slice) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names, dict(self.meta))


def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], on the images' device."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def mix_classes(image_set: ImageSet, seed: int) -> tuple[ImageSet, list[int] | None]:
    """Class-folder sources come grouped by class; put them in a seeded random order instead, as the official
    CIFAR-10(-C) test order is, so that "the first n images" and online streams mix classes. Sets already
    mixed (torchvision's CIFAR-10, official CIFAR-10-C) keep their order. Returns (set, source row per row or None)."""
    labels = image_set.labels
    if len(labels) < 2 or not bool((labels[1:] >= labels[:-1]).all()):
        return image_set, None
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return image_set.subset(order), order.tolist()
