"""The comparators' augmentations, drawn on the device, against the PIL operations the authors used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tta_cli.data import augmix as ops

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the machine is shared: one thread is faster


@pytest.fixture
def batch():
    """Two random images already on the 8-bit grid (as PIL holds them), float64."""
    pixels = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    return pixels.double() / 255


def pil(images: torch.Tensor, operation) -> torch.Tensor:
    """Apply a PIL operation to each image of a float batch and come back to floats."""
    out = []
    for image in images:
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        out.append(torch.from_numpy(np.asarray(operation(Image.fromarray(array))).astype(np.float64) / 255).permute(2, 0, 1))
    return torch.stack(out)


LEVEL = torch.ones(2, dtype=torch.float64)
SIGN = torch.ones(2, dtype=torch.float64)


@pytest.mark.parametrize("operation, reference", [
    (ops.autocontrast, ImageOps.autocontrast),
    (ops.equalize, ImageOps.equalize),
    (ops.posterize, lambda image: ImageOps.posterize(image, 4)),
    (ops.solarize, lambda image: ImageOps.solarize(image, 256 - 25)),
])
def test_pointwise_operations_match_pil_exactly(batch, operation, reference):
    assert torch.allclose(operation(batch, LEVEL, SIGN), pil(batch, reference), atol=1e-12)


def test_shear_matches_pil_inside_the_image(batch):
    def sheared(image):
        return image.transform((32, 32), Image.AFFINE, (1, 0.03, 0, 0, 1, 0), resample=Image.BILINEAR, fillcolor=128)

    ours, theirs = ops.shear_x(batch, LEVEL, SIGN), pil(batch, sheared)
    # PIL interpolates in 8-bit fixed point; the last column blends with grey (see the module docstring)
    assert torch.allclose(ours[..., :-1], theirs[..., :-1], atol=1.01 / 255)


def test_translate_moves_by_whole_pixels_and_fills_grey(batch):
    moved = ops.translate_x(batch, LEVEL, SIGN)  # level 1: one pixel
    assert torch.allclose(moved[..., :-1], batch[..., 1:], atol=1e-12)
    assert torch.allclose(moved[..., -1], torch.full_like(moved[..., -1], 128 / 255), atol=1e-12)


def test_augmix_views_are_in_range_different_per_row_and_reproducible(batch):
    image = batch[:1].expand(6, -1, -1, -1)
    views = ops.augmix(image, torch.Generator().manual_seed(3))
    assert views.shape == image.shape and views.min() >= 0 and views.max() <= 1
    assert len({tuple(view.flatten()[:50].tolist()) for view in views}) == 6
    assert torch.equal(views, ops.augmix(image, torch.Generator().manual_seed(3)))


# ---- CoTTA ----------------------------------------------------------------------------------------


def test_cotta_colour_operations_match_torchvision(batch):
    from torchvision.transforms import functional as tvf

    from tta_cli.data import cotta_augment as cotta

    factor = torch.tensor([0.8, 1.3], dtype=torch.float64).view(-1, 1, 1, 1)
    shift = torch.tensor([-0.05, 0.04], dtype=torch.float64).view(-1, 1, 1, 1)
    for ours, theirs, amount in [
        (cotta.brightness, tvf.adjust_brightness, factor), (cotta.contrast, tvf.adjust_contrast, factor),
        (cotta.saturation, tvf.adjust_saturation, factor), (cotta.hue, tvf.adjust_hue, shift),
        (cotta.gamma, tvf.adjust_gamma, factor),
    ]:
        expected = torch.stack([theirs(image, float(value)) for image, value in zip(batch, amount.flatten(), strict=True)])
        assert torch.allclose(ours(batch, amount), expected, atol=1e-6), ours.__name__


def test_cotta_geometry_is_the_identity_at_zero_angle_shift_and_blur(batch):
    from tta_cli.data import cotta_augment as cotta

    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2), mode="replicate")
    assert torch.allclose(cotta.gaussian_blur(padded, torch.full((2,), 1e-3, dtype=torch.float64)), batch, atol=1e-12)
    views = cotta.cotta_augment(batch, torch.Generator().manual_seed(0))
    assert views.shape == batch.shape and views.min() >= 0 and views.max() <= 1
    assert 0.01 < (views - batch).abs().mean() < 0.5  # changed, but still the same picture
