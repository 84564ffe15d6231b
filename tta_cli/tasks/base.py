"""The interface every self-supervised task implements, used by training and adaptation alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from tta_cli.models.features import FeatureSpec


class SSLTask(Protocol):
    """make_batch builds inputs/targets from clean images; loss scores the ssl head's outputs.

    `mode="train"` may expand the batch (rotation `expand`); `mode="adapt"` draws one random
    transformation per image, which is what per-sample test-time training needs.
    """

    name: str

    def build_output(self, spec: FeatureSpec, img_size: int) -> nn.Module: ...

    def make_batch(
        self, images: torch.Tensor, mode: str = "train", generator: torch.Generator | None = None,
        shard: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`shard=(rank, world_size)`: `images` are rows rank, rank + world_size, ... of a global batch
        (data-parallel training); random draws then follow `draw_for_shard`. Equals
        `apply(images, draw(images.shape, images.device, mode, generator, shard), mode)`."""
        ...

    def draw(
        self, shape: tuple[int, ...], device: torch.device, mode: str = "train", generator: torch.Generator | None = None,
        shard: tuple[int, int] | None = None,
    ) -> torch.Tensor | None:
        """Every random number `make_batch` needs for images of `shape` (None: it needs none)."""
        ...

    def apply(self, images: torch.Tensor, drawn: torch.Tensor | None, /, mode: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """`make_batch` given its random numbers: deterministic, so it can be compiled (the draws stay eager and in
        program order; a compiler may reorder random ops, pytorch/pytorch#181136)."""
        ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A per-image quality number for reports: rotation accuracy, or negative reconstruction error."""
        ...


def draw_for_shard(draw: Callable[[int], torch.Tensor], rows: int, shard: tuple[int, int] | None) -> torch.Tensor:
    """`draw(n)` -> n random rows. For a shard (rank, world_size) of a global batch, draw the rows of the
    whole global batch and keep this rank's, so each image gets the draw of a single-process run."""
    if shard is None:
        return draw(rows)
    rank, world_size = shard
    return draw(rows * world_size)[rank::world_size]
