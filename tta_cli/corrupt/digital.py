"""Digital corruptions (brightness, contrast, saturate, elastic, pixelate, JPEG) with the CIFAR-10-C
parameters, batched on the images' device (JPEG runs on CPU threads: it needs a real codec)."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from tta_cli.corrupt.ops import (
    gather_bilinear,
    gaussian_filter,
    hsv_to_rgb,
    pil_resize_box,
    rgb_to_hsv,
    to_uint8,
    to_unit,
    uniform,
)


def brightness(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Add to V in skimage's HSV, clipped to [0, 1]."""
    shift = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    hsv = rgb_to_hsv(to_unit(images))
    hsv = torch.stack((hsv[:, 0], hsv[:, 1], (hsv[:, 2] + shift).clamp(0.0, 1.0)), 1)
    return to_uint8(hsv_to_rgb(hsv))


def saturate(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Scale and shift S in skimage's HSV, clipped to [0, 1]."""
    factor, shift = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))[severity - 1]
    hsv = rgb_to_hsv(to_unit(images))
    hsv = torch.stack((hsv[:, 0], (hsv[:, 1] * factor + shift).clamp(0.0, 1.0), hsv[:, 2]), 1)
    return to_uint8(hsv_to_rgb(hsv))


def contrast(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Pull each channel towards its per-image mean: (x - mean) * c + mean."""
    factor = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    unit = to_unit(images)
    means = unit.mean(dim=(2, 3), keepdim=True)
    return to_uint8((unit - means) * factor + means)


def pixelate(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """PIL BOX downscale to int(size * c) then BOX upscale back, in PIL's fixed-point arithmetic
    (tests compare it with PIL itself: identical)."""
    factor = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    _, height, width, _ = images.shape
    values = images.permute(0, 3, 1, 2).to(torch.float64)
    small = pil_resize_box(values, int(height * factor), int(width * factor))
    return pil_resize_box(small, height, width).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _jpeg_round_trip(chunk: torch.Tensor, quality: int) -> torch.Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.stack([decode_jpeg(encode_jpeg(image, quality=quality)) for image in chunk])


def jpeg_compression(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Real JPEG encode + decode at quality 80/65/58/50/40 with libjpeg (torchvision.io, CPU).

    Checked against PIL's `save(..., 'JPEG', quality=q)` + `Image.open` (what the generator does) on
    2,000 CIFAR test images and 2,000 noise images at every quality: byte-identical pixels (also in
    tests/test_corrupt.py). CUDA inputs go through CPU threads, since nvjpeg is not libjpeg.
    """
    quality = (80, 65, 58, 50, 40)[severity - 1]
    planar = images.permute(0, 3, 1, 2).contiguous().cpu()  # (N, 3, H, W)
    workers = min(8, os.cpu_count() or 1)
    if workers < 4 or planar.shape[0] < 512:
        decoded = _jpeg_round_trip(planar, quality)
    else:
        chunks = torch.split(planar, (planar.shape[0] + workers - 1) // workers)
        with ThreadPoolExecutor(workers) as pool:
            decoded = torch.cat(list(pool.map(lambda chunk: _jpeg_round_trip(chunk, quality), chunks)))
    return decoded.permute(0, 2, 3, 1).contiguous().to(images.device)


def _cv2_warp_affine_reflect101(unit: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """cv2.warpAffine(INTER_LINEAR, BORDER_REFLECT_101) with per-image inverse maps (N, 2, 3):
    source coordinates in OpenCV's fixed point (1/1024, rounded to 1/32 pixel), float32 weights."""
    count, _, height, width = unit.shape
    device = unit.device
    cols = torch.arange(width, device=device, dtype=torch.float64)[None, None, :]
    rows = torch.arange(height, device=device, dtype=torch.float64)[None, :, None]
    m = inverse[:, :, :, None, None]  # (N, 2, 3, 1, 1)
    x_fixed = torch.round(m[:, 0, 0] * cols * 1024) + torch.round((m[:, 0, 1] * rows + m[:, 0, 2]) * 1024) + 16
    y_fixed = torch.round(m[:, 1, 0] * cols * 1024) + torch.round((m[:, 1, 1] * rows + m[:, 1, 2]) * 1024) + 16
    x_32 = torch.floor(x_fixed / 32).long()  # (N, H, W) in 1/32 pixel
    y_32 = torch.floor(y_fixed / 32).long()
    col0, row0 = torch.div(x_32, 32, rounding_mode="floor"), torch.div(y_32, 32, rounding_mode="floor")
    col_frac = (x_32 - col0 * 32).to(torch.float32) / 32
    row_frac = (y_32 - row0 * 32).to(torch.float32) / 32
    return gather_bilinear(unit, row0, col0, row_frac, col_frac, "mirror")


def elastic_transform(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Random affine (3 points moved by U(-a, a), cv2.warpAffine) then a smooth random displacement
    field (U(-1, 1) blurred by skimage gaussian, reflect, truncate 3, times alpha) sampled with
    scipy map_coordinates(order=1, mode='reflect'). Parameters are the CIFAR fractions of the image size."""
    alpha, sigma, affine = (
        (0.0, 0.0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    )[severity - 1]
    unit = to_unit(images, torch.float32)
    count, _, height, width = unit.shape
    size = min(height, width)
    alpha, sigma, affine = size * alpha, size * sigma, size * affine
    device = unit.device

    center_row, center_col = float(height // 2), float(width // 2)
    square = float(size // 3)
    source_points = torch.tensor(
        [
            [center_row + square, center_col + square],
            [center_row + square, center_col - square],
            [center_row - square, center_col - square],
        ],
        dtype=torch.float32,
        device=device,
    )
    jitter = uniform((count, 3, 2), -affine, affine, generator).to(torch.float32)
    target_points = (source_points + jitter).to(torch.float64)  # (N, 3, 2) as (x, y)
    homogeneous = torch.cat((source_points.to(torch.float64), torch.ones(3, 1, dtype=torch.float64, device=device)), 1)
    forward = torch.linalg.solve(homogeneous.expand(count, 3, 3), target_points).transpose(1, 2)  # (N, 2, 3)
    linear = torch.linalg.inv(forward[:, :, :2])
    inverse = torch.cat((linear, -(linear @ forward[:, :, 2:])), 2)
    warped = _cv2_warp_affine_reflect101(unit, inverse)

    shift_x = (gaussian_filter(uniform((count, height, width), -1, 1, generator), sigma, "reflect", 3.0) * alpha).to(torch.float32)
    shift_y = (gaussian_filter(uniform((count, height, width), -1, 1, generator), sigma, "reflect", 3.0) * alpha).to(torch.float32)
    rows = torch.arange(height, device=device, dtype=torch.float64)[None, :, None] + shift_y.to(torch.float64)
    cols = torch.arange(width, device=device, dtype=torch.float64)[None, None, :] + shift_x.to(torch.float64)
    row0, col0 = torch.floor(rows), torch.floor(cols)
    sampled = gather_bilinear(warped.to(torch.float64), row0.long(), col0.long(), rows - row0, cols - col0, "reflect")
    return to_uint8(sampled.to(torch.float32))
