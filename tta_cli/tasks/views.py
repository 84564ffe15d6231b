"""Augmented views of test inputs for the self-supervised loss: crop (4-pixel padding, as the checkpoint's
training crop padded: `task.view_pad_mode`) + flip, then one random task transformation (rotation or mask)
per view. Drawn on the inputs' device."""

from __future__ import annotations

import torch

from tta_cli.data.augment import crop_flip, sample_crop_flip

PADDING = 4


def draw_views(task, shape: tuple[int, ...], copies: int, device, generator: torch.Generator | None = None) -> tuple:
    """Every random number of `copies` views of each of `shape[0]` images (B, C, H, W): the crops' offsets and
    flips, then the task's draw, in that order."""
    rows = shape[0] * copies
    return (*sample_crop_flip(rows, PADDING, generator, device), task.draw((rows, *shape[1:]), device, "adapt", generator))


def views_from_draws(task, images: torch.Tensor, copies: int, draws: tuple):
    """The views `draws` (from `draw_views`) describe: deterministic, so the online path compiles it."""
    offsets_y, offsets_x, flips, task_draw = draws
    repeated = images.repeat_interleave(copies, dim=0)
    augmented = crop_flip(repeated, offsets_y, offsets_x, flips, PADDING, task.view_pad_mode)
    return task.apply(augmented, task_draw, mode="adapt")


def make_views(task, images: torch.Tensor, copies: int, generator: torch.Generator | None = None):
    """images (B, C, H, W) in [0, 1] -> inputs (B * copies, C, H, W), targets (B * copies, ...),
    grouped per image: rows i*copies .. (i+1)*copies-1 come from image i."""
    return views_from_draws(task, images, copies, draw_views(task, images.shape, copies, images.device, generator))


def grouped_views(task, images: torch.Tensor, copies: int, generator: torch.Generator | None = None):
    """`make_views`, shaped per image: inputs (B, copies, C, H, W), targets (B, copies, ...), for per-sample weights."""
    inputs, targets = make_views(task, images, copies, generator)
    return inputs.reshape(images.shape[0], copies, *inputs.shape[1:]), targets.reshape(images.shape[0], copies, *targets.shape[1:])
