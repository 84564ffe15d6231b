"""A GPU-resident batch loader: the whole uint8 set lives on the device; batches are index + convert.

Each epoch draws one seeded permutation on the device; with `world_size` > 1 it is padded (by
repeating its start) to a multiple of `world_size` and rank r takes positions r, r + world_size, ...
(like DistributedSampler), so ranks see disjoint shards of equal length. No host sync per batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from tta_cli.data.augment import random_crop_flip
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
        self.augment, self.padding, self.seed = augment, padding, seed
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
        if self.drop_last:
            return self.shard_size // self.batch_size
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
                images = random_crop_flip(images, self.padding, augment_generator)
            yield images, self.labels[batch_indices]

    def _generator(self, purpose: str) -> torch.Generator:
        """A device generator seeded from (seed, epoch, purpose): the order is shared by all ranks,
        augmentation differs per rank."""
        entropy = [self.seed, self.epoch, 0] if purpose == "order" else [self.seed, self.epoch, 1, self.rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
        return torch.Generator(device=self.device).manual_seed(seed)
