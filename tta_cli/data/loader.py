"""A GPU-resident batch loader: the whole uint8 set lives on the device; batches are index + convert.

Each epoch draws one seeded permutation on the device; with `world_size` > 1 it is padded (by
repeating its start) to a multiple of `world_size` and rank r takes positions r, r + world_size, ...
(like DistributedSampler), so ranks see disjoint shards of equal length. No host sync per batch.
With `batch_size` b per rank, the k-th batches of all ranks together are the k-th batch of a
single-process loader with batch b * world_size, and each image gets the same crop and flip.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from tta_cli.data.augment import crop_flip, sample_crop_flip
from tta_cli.data.imageset import ImageSet, to_float_nchw


class DeviceLoader:
    """Yields (images float (B, 3, H, W) in [0, 1], labels int64 (B,)) on `device`; crop+flip if `augment`."""

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = False,
        padding: int = 4,
        pad_mode: str = "zeros",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)  # uint8 (N, H, W, 3)
        self.labels = data.labels.to(self.device)  # int64 (N,)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.padding, self.pad_mode, self.seed = augment, padding, pad_mode, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose permutation (and augmentation) the next iteration uses."""
        self.epoch = epoch

    @property
    def shard_size(self) -> int:
        """Images this rank sees per epoch (the padded count split evenly over ranks)."""
        return -(-self.labels.shape[0] // self.world_size)

    def __len__(self) -> int:
        if self.drop_last:  # only whole global batches of real (not padding) images
            return self.labels.shape[0] // self.world_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def epoch_indices(self) -> torch.Tensor:
        """This rank's image indices for the current epoch, in order, on the device."""
        count = self.labels.shape[0]
        if self.shuffle:
            order = torch.randperm(count, generator=self._generator("order"), device=self.device)
        else:
            order = torch.arange(count, device=self.device)
        padded_count = self.shard_size * self.world_size
        if padded_count > count:
            order = torch.cat([order, order[: padded_count - count]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices()
        augment_generator = self._generator("augment") if self.augment else None
        for batch in range(len(self)):
            batch_indices = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            images = to_float_nchw(self.images[batch_indices])
            if self.augment:
                images = self._crop_flip(images, augment_generator)
            yield images, self.labels[batch_indices]

    def _crop_flip(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw crops and flips for the whole global batch (world_size times this rank's rows) and keep this
        rank's positions rank, rank + world_size, ...: the draws of a single-process run, image for image."""
        offsets_y, offsets_x, flips = sample_crop_flip(images.shape[0] * self.world_size, self.padding, generator, self.device)
        mine = slice(self.rank, None, self.world_size)
        return crop_flip(images, offsets_y[mine], offsets_x[mine], flips[mine], self.padding, self.pad_mode)

    def _generator(self, purpose: str) -> torch.Generator:
        """A device generator seeded from (seed, epoch, purpose), the same on every rank: all ranks draw the
        same order and the same augmentation stream, of which each keeps its own rows."""
        entropy = [self.seed, self.epoch, 0] if purpose == "order" else [self.seed, self.epoch, 1, 0]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
        return torch.Generator(device=self.device).manual_seed(seed)
