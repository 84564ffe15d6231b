"""CIFAR training augmentation on a batch, on its device: random crop of a padded copy + horizontal flip.

With `pad_mode` "zeros" it matches torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip: black
borders in [0, 1] pixel space, far from the data mean once normalised, which raise the variance the first
normalization layer sees in training by about half over clean images (tests/test_augment.py). "reflect"
mirrors the image into the border instead, keeping its statistics: a BatchNorm model's training batches
then look like clean test batches to test-time batch statistics (`norm`, `tent`). Crop offsets index the padded image: 0..2*padding, where
`padding` is the un-shifted crop. One gather for the whole batch, no per-image Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_crop_flip(
    batch: int, padding: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (offsets_y, offsets_x, flips) for `batch` images, drawn on `device` (the generator's device)."""
    if generator is not None and device is not None and torch.device(device).type != generator.device.type:
        raise ValueError(f"generator on {generator.device} cannot draw numbers on {device}; make it on the images' device")
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=device)
    flips = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()
    return offsets[0], offsets[1], flips


PAD_MODES = {"zeros": "constant", "reflect": "reflect"}  # tta's name -> torch.nn.functional.pad's


def crop_flip(
    images: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor, flips: torch.Tensor, padding: int = 4, pad_mode: str = "zeros"
) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): image b is cropped at (offsets_y[b], offsets_x[b]) of its padded
    copy (`pad_mode`: zeros or reflect), then mirrored left-right where flips[b]."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding), mode=PAD_MODES[pad_mode])  # (B, C, H + 2p, W + 2p)
    padded_width = width + 2 * padding
    rows = offsets_y.long()[:, None] + torch.arange(height, device=images.device)  # (B, H)
    columns = torch.arange(width, device=images.device).expand(batch, width)  # (B, W)
    columns = torch.where(flips.bool()[:, None], columns.flip(1), columns) + offsets_x.long()[:, None]
    flat_index = (rows[:, :, None] * padded_width + columns[:, None, :]).view(batch, 1, height * width)
    gathered = padded.flatten(2).gather(2, flat_index.expand(batch, channels, height * width))
    return gathered.view(batch, channels, height, width)


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None, pad_mode: str = "zeros"
) -> torch.Tensor:
    """Random crop (padding `padding`, zeros or reflect) + random horizontal flip of each image of a float (B, C, H, W) batch."""
    offsets_y, offsets_x, flips = sample_crop_flip(images.shape[0], padding, generator, images.device)
    return crop_flip(images, offsets_y, offsets_x, flips, padding, pad_mode)


def random_crop_flip_reference(
    images: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor, flips: torch.Tensor, padding: int = 4, pad_mode: str = "zeros"
) -> torch.Tensor:
    """The obvious per-image loop, to check `crop_flip` against."""
    height, width = images.shape[-2:]
    output = []
    for image, top, left, flip in zip(images, offsets_y.tolist(), offsets_x.tolist(), flips.tolist(), strict=True):
        padded = F.pad(image[None], (padding, padding, padding, padding), mode=PAD_MODES[pad_mode])[0]
        crop = padded[:, top : top + height, left : left + width]
        output.append(crop.flip(-1) if flip else crop)
    return torch.stack(output)
