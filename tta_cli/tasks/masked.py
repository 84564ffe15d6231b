"""Masked reconstruction (as MAE, He et al. 2022): hide most patches, rebuild their pixels.

For every backbone the hidden patches are set to mid-gray (0.5), which the model's normalization
maps to about zero: zeroed patches, not a mask channel. The encoder keeps its 3 input channels, so
the classifier's own encoder serves both heads and sees the same kind of input at test time.
"""

from __future__ import annotations

import torch
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.models.features import FeatureSpec
from tta_cli.tasks.base import draw_for_shard

FILL = 0.5


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C), patches in row-major order."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch, width // patch
    patches = images.reshape(batch, channels, grid_h, patch, grid_w, patch)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch * patch * channels)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """(B, L, patch*patch*C) -> (B, C, H, W) for a square grid."""
    batch, length, _ = patches.shape
    grid = int(round(length**0.5))
    images = patches.reshape(batch, grid, grid, patch, patch, channels)
    return images.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid * patch, grid * patch)


class MapDecoder(nn.Module):
    """Light CNN decoder: a 1x1 conv to pixels of each feature cell, then pixel-shuffle to full size."""

    def __init__(self, spec: FeatureSpec, img_size: int):
        super().__init__()
        self.scale = img_size // spec.grid
        self.proj = nn.Conv2d(spec.channels, 3 * self.scale * self.scale, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(self.proj(features), self.scale)


class TokenDecoder(nn.Module):
    """Linear per patch token to its pixels (MAE's prediction layer), then back to an image."""

    def __init__(self, spec: FeatureSpec, img_size: int):
        super().__init__()
        self.has_cls = spec.has_cls
        self.patch = img_size // spec.grid
        self.proj = nn.Linear(spec.channels, 3 * self.patch * self.patch)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.has_cls:
            tokens = tokens[:, 1:]
        return unpatchify(self.proj(tokens), self.patch)


class MaskedTask:
    """Hide `mask_ratio` of `patch_size` patches; loss = MSE on hidden patches, against per-patch normalised
    pixels (`norm_targets`, MAE's default: a flat patch's small differences are magnified) or the pixels as they are.

    targets pack, per patch, the target pixels (normalised or not) and a last column that is 1 where hidden:
    (B, L, patch*patch*3 + 1), so a batch stays one tensor (which batched adaptation needs).
    """

    name = "masked"

    def __init__(self, mask_ratio: float = 0.75, patch_size: int = 4, view_pad_mode: str = "zeros", norm_targets: bool = True):
        if not 0.0 < mask_ratio < 1.0:
            raise TTAError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.patch = patch_size
        self.view_pad_mode = view_pad_mode  # the crop padding of test-time views (tasks/views.py)
        self.norm_targets = norm_targets

    def build_output(self, spec: FeatureSpec, img_size: int) -> nn.Module:
        if img_size % self.patch:
            raise TTAError(f"image size {img_size} is not a multiple of the mask patch size {self.patch}")
        return MapDecoder(spec, img_size) if spec.kind == "map" else TokenDecoder(spec, img_size)

    def sample_mask(self, batch: int, patches: int, device, generator=None, shard=None) -> torch.Tensor:
        """(B, L) float, exactly round(ratio * L) ones per row, uniformly placed."""
        hidden = int(round(self.mask_ratio * patches))
        noise = draw_for_shard(lambda rows: torch.rand(rows, patches, device=device, generator=generator), batch, shard)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        return (ranks < hidden).float()

    def draw(self, shape: tuple[int, ...], device, mode: str = "train", generator=None, shard=None) -> torch.Tensor:
        """The random part of `make_batch` for images of `shape` (B, C, H, W): the (B, L) mask."""
        if shape[-1] % self.patch or shape[-2] % self.patch:
            raise TTAError(f"image size {tuple(shape[-2:])} is not a multiple of the patch size {self.patch}")
        return self.sample_mask(shape[0], (shape[-2] // self.patch) * (shape[-1] // self.patch), device, generator, shard)

    def apply(self, images: torch.Tensor, mask: torch.Tensor, /, mode: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic part of `make_batch`: hide the patches `mask` marks, and pack the targets."""
        patches = patchify(images, self.patch)  # (B, L, P)
        masked_patches = torch.where(mask[..., None].bool(), torch.full_like(patches, FILL), patches)
        inputs = unpatchify(masked_patches, self.patch, images.shape[1])
        targets = patches
        if self.norm_targets:
            targets = (patches - patches.mean(dim=-1, keepdim=True)) / (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return inputs, torch.cat([targets, mask[..., None]], dim=-1)

    def make_batch(self, images, mode="train", generator=None, shard=None):
        return self.apply(images, self.draw(images.shape, images.device, mode, generator, shard), mode)

    def per_image_error(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) mean squared error over each image's hidden patches."""
        predicted = patchify(outputs.float(), self.patch)
        target_pixels, mask = targets[..., :-1], targets[..., -1]
        per_patch = (predicted - target_pixels).pow(2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum(dim=1) / mask.sum(dim=1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.per_image_error(outputs, targets).mean()

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -self.per_image_error(outputs, targets)
