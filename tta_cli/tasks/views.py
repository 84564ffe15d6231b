"""Augmented views of test inputs for the self-supervised loss: crop (4-pixel padding, as the checkpoint's
training crop padded: `task.view_pad_mode`) + flip, then one random task transformation (rotation or mask)
per view. Drawn on the inputs' device."""

from __future__ import annotations

import torch

from tta_cli.data.augment import random_crop_flip


def make_views(task, images: torch.Tensor, copies: int, generator: torch.Generator | None = None):
    """images (B, C, H, W) in [0, 1] -> inputs (B * copies, C, H, W), targets (B * copies, ...),
    grouped per image: rows i*copies .. (i+1)*copies-1 come from image i."""
    repeated = images.repeat_interleave(copies, dim=0)
    augmented = random_crop_flip(repeated, padding=4, generator=generator, pad_mode=task.view_pad_mode)
    return task.make_batch(augmented, mode="adapt", generator=generator)


def grouped_views(task, images: torch.Tensor, copies: int, generator: torch.Generator | None = None):
    """`make_views`, shaped per image: inputs (B, copies, C, H, W), targets (B, copies, ...), for per-sample weights."""
    inputs, targets = make_views(task, images, copies, generator)
    return inputs.reshape(images.shape[0], copies, *inputs.shape[1:]), targets.reshape(images.shape[0], copies, *targets.shape[1:])
