"""Rotation prediction (Gidaris et al. 2018), as TTT uses it: which of 0/90/180/270 degrees."""

from __future__ import annotations

import torch
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.models.features import FeatureSpec, LinearClassifier
from tta_cli.tasks.base import draw_for_shard

MODES = ("expand", "random")


def rotate(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Rotate each (C, H, W) image counter-clockwise by its own number of quarter turns (square images).

    Batched without Python loops: all four rotations are computed and the right one selected.
    """
    choices = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])  # (4, B, C, H, W)
    index = quarter_turns.view(1, -1, 1, 1, 1).expand(1, *images.shape)
    return choices.gather(0, index).squeeze(0)


class RotationTask:
    """4-way rotation classification; `expand` trains on all four rotations of every image."""

    name = "rotation"
    classes = 4

    def __init__(self, mode: str = "expand", view_pad_mode: str = "zeros"):
        if mode not in MODES:
            raise TTAError(f"unknown rotation mode {mode!r}; choose one of: {', '.join(MODES)}")
        self.mode = mode
        self.view_pad_mode = view_pad_mode  # the crop padding of test-time views (tasks/views.py)

    def build_output(self, spec: FeatureSpec, img_size: int) -> nn.Module:
        return LinearClassifier(spec, self.classes)

    def draw(self, shape: tuple[int, ...], device, mode: str = "train", generator=None, shard=None) -> torch.Tensor | None:
        """The random part of `make_batch` for images of `shape`: (B,) quarter turns, or None when training in
        `expand` mode (every image in all four turns: nothing to draw)."""
        if mode == "train" and self.mode == "expand":
            return None
        return draw_for_shard(lambda n: torch.randint(0, 4, (n,), device=device, generator=generator), shape[0], shard)

    def apply(self, images: torch.Tensor, quarter_turns: torch.Tensor | None, /, mode: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic part of `make_batch`: each image turned by its quarter turns (None: all four turns)."""
        if images.shape[-1] != images.shape[-2]:
            raise TTAError(f"rotation needs square images, got {tuple(images.shape[-2:])}")
        if quarter_turns is None:
            inputs = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
            return inputs, torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
        return rotate(images, quarter_turns), quarter_turns

    def make_batch(self, images, mode="train", generator=None, shard=None):
        """images (B, C, H, W) -> inputs (B or 4B, C, H, W), targets (B or 4B,) quarter turns."""
        return self.apply(images, self.draw(images.shape, images.device, mode, generator, shard), mode)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs.float(), targets)

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(dim=1) == targets).float()

    def confidence(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean softmax probability of the true rotation: the paper's skip-update gate."""
        probabilities = outputs.float().softmax(dim=1)
        return probabilities.gather(1, targets[:, None]).mean()
