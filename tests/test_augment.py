"""Batched crop+flip against its per-image twin, and the device-resident loader's epochs and shards."""

from __future__ import annotations

import pytest
import torch

from tta_cli.data import DeviceLoader, ImageSet
from tta_cli.data.augment import crop_flip, random_crop_flip, random_crop_flip_reference, sample_crop_flip

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def batch(count: int = 16, height: int = 8, width: int = 10, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Non-square random images, so a swapped axis cannot pass."""
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(0), dtype=dtype)


def indexed_set(count: int) -> ImageSet:
    """Image i is filled with value i % 256 and labelled i, so batches reveal which indices they hold."""
    images = (torch.arange(count) % 256).to(torch.uint8).view(count, 1, 1, 1).expand(count, 4, 4, 3).contiguous()
    return ImageSet(images, torch.arange(count), ["only"])


@pytest.mark.parametrize("padding", [0, 2, 4])
def test_batched_crop_flip_equals_per_image_reference(padding: int):
    images = batch()
    offsets_y, offsets_x, flips = sample_crop_flip(16, padding, torch.Generator().manual_seed(1))
    expected = random_crop_flip_reference(images, offsets_y, offsets_x, flips, padding)
    assert torch.equal(crop_flip(images, offsets_y, offsets_x, flips, padding), expected)


def test_random_crop_flip_keeps_shape_dtype_and_range():
    images = batch(dtype=torch.float32)
    augmented = random_crop_flip(images, 4, torch.Generator().manual_seed(2))
    assert augmented.shape == images.shape and augmented.dtype == torch.float32
    assert 0.0 <= augmented.min() and augmented.max() <= 1.0


def test_centered_crop_is_identity_and_flip_is_torch_flip():
    images = batch()
    centered = torch.full((16,), 4)
    assert torch.equal(crop_flip(images, centered, centered, torch.zeros(16, dtype=torch.bool), 4), images)
    assert torch.equal(crop_flip(images, centered, centered, torch.ones(16, dtype=torch.bool), 4), torch.flip(images, [-1]))


def test_corner_crop_shifts_in_zero_padding():
    images = batch()
    corner = torch.zeros(16, dtype=torch.long)
    shifted = crop_flip(images, corner, corner, torch.zeros(16, dtype=torch.bool), 2)
    assert shifted[:, :, :2].abs().sum() == 0 and shifted[:, :, :, :2].abs().sum() == 0
    assert torch.equal(shifted[:, :, 2:, 2:], images[:, :, :-2, :-2])


def test_sampler_offsets_cover_zero_to_twice_padding():
    offsets_y, offsets_x, flips = sample_crop_flip(4000, 3, torch.Generator().manual_seed(3))
    assert set(offsets_y.tolist()) == set(offsets_x.tolist()) == set(range(7))
    assert 0.4 < flips.float().mean() < 0.6


def test_same_generator_seed_gives_same_augmentation():
    images = batch()
    first = random_crop_flip(images, 4, torch.Generator().manual_seed(5))
    assert torch.equal(random_crop_flip(images, 4, torch.Generator().manual_seed(5)), first)


@pytest.mark.parametrize("drop_last, expected_batches", [(False, 4), (True, 3)])
def test_loader_yields_each_index_once_per_epoch(drop_last: bool, expected_batches: int):
    loader = DeviceLoader(indexed_set(10), batch_size=3, drop_last=drop_last, seed=7)
    labels = [labels for _, labels in loader]
    assert len(labels) == len(loader) == expected_batches
    seen = torch.cat(labels).tolist()
    assert len(seen) == len(set(seen)) == (9 if drop_last else 10)
    images, _ = next(iter(loader))
    assert images.shape == (3, 3, 4, 4) and images.dtype == torch.float32
    assert torch.allclose(images[:, 0, 0, 0] * 255, labels[0].float())


def test_loader_epochs_reshuffle_reproducibly():
    loader = DeviceLoader(indexed_set(50), batch_size=50, seed=1)
    epoch_0 = loader.epoch_indices()
    loader.set_epoch(1)
    assert not torch.equal(loader.epoch_indices(), epoch_0)
    loader.set_epoch(0)
    assert torch.equal(loader.epoch_indices(), epoch_0)
    assert torch.equal(DeviceLoader(indexed_set(50), 50, shuffle=False).epoch_indices(), torch.arange(50))


@pytest.mark.parametrize("count, world_size", [(12, 3), (10, 3), (5, 4)])
def test_rank_shards_partition_the_epoch_permutation(count: int, world_size: int):
    shards = [DeviceLoader(indexed_set(count), 2, seed=4, rank=rank, world_size=world_size).epoch_indices() for rank in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1
    padded = torch.cat(shards)
    assert len(padded) == -(-count // world_size) * world_size
    assert set(padded.tolist()) == set(range(count))
    if count % world_size == 0:
        assert sorted(padded.tolist()) == list(range(count))


def test_augmenting_loader_yields_crops_of_its_images():
    loader = DeviceLoader(indexed_set(8), batch_size=8, augment=True, padding=1, seed=2, shuffle=False)
    images, labels = next(iter(loader))
    values = (images * 255).round()
    assert torch.equal(labels, torch.arange(8))
    assert all(set(values[i].unique().tolist()) <= {0.0, float(i)} for i in range(8))


@needs_cuda
def test_crop_flip_on_cuda_matches_reference_and_stays_on_device():
    images = batch().cuda()
    offsets_y, offsets_x, flips = sample_crop_flip(16, 4, torch.Generator("cuda").manual_seed(1), images.device)
    assert offsets_y.is_cuda and flips.is_cuda
    fast = crop_flip(images, offsets_y, offsets_x, flips, 4)
    expected = random_crop_flip_reference(images.cpu(), offsets_y.cpu(), offsets_x.cpu(), flips.cpu(), 4)
    assert fast.is_cuda and torch.equal(fast.cpu(), expected)


@needs_cuda
def test_loader_on_cuda_keeps_data_and_batches_on_the_gpu():
    loader = DeviceLoader(indexed_set(10), batch_size=4, device="cuda", augment=True)
    assert loader.images.is_cuda
    seen = []
    for images, labels in loader:
        assert images.is_cuda and labels.is_cuda
        seen.extend(labels.tolist())
    assert sorted(seen) == list(range(10))


def test_reflect_padded_crops_equal_the_per_image_loop_and_keep_a_flat_image_flat():
    from tta_cli.data.augment import crop_flip, random_crop_flip_reference, sample_crop_flip

    images = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    offsets_y, offsets_x, flips = sample_crop_flip(6, 2, torch.Generator().manual_seed(0))
    fast = crop_flip(images, offsets_y, offsets_x, flips, padding=2, pad_mode="reflect")
    torch.testing.assert_close(fast, random_crop_flip_reference(images, offsets_y, offsets_x, flips, padding=2, pad_mode="reflect"))
    flat = torch.full((4, 3, 8, 8), 0.5)
    assert torch.equal(crop_flip(flat, offsets_y[:4], offsets_x[:4], flips[:4], padding=2, pad_mode="reflect"), flat)


def test_test_time_views_pad_as_the_checkpoint_was_trained():
    from tta_cli.config import TaskConfig
    from tta_cli.tasks import build_task
    from tta_cli.tasks.views import make_views

    flat = torch.full((2, 3, 32, 32), 0.5)
    generator = torch.Generator().manual_seed(0)
    reflect_views, _ = make_views(build_task(TaskConfig(), "reflect"), flat, 16, generator)
    zero_views, _ = make_views(build_task(TaskConfig(), "zeros"), flat, 16, generator)
    assert torch.equal(reflect_views, torch.full_like(reflect_views, 0.5))
    assert (zero_views == 0).any()
