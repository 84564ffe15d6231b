"""Blur corruptions with the CIFAR-10-C parameters, batched on the images' device."""

from __future__ import annotations

import functools

import numpy as np
import torch

from tta_cli.corrupt.ops import (
    clipped_zoom_matrix,
    correlate2d,
    gaussian_filter,
    magick_motion_blur,
    to_uint8,
    to_unit,
    uniform,
    values_to_uint8,
)

# np.arange exactly as the original calls it (its float steps make 7, 12, 16, 21, 26 zooms).
ZOOM_FACTORS = (
    np.arange(1, 1.06, 0.01),
    np.arange(1, 1.11, 0.01),
    np.arange(1, 1.16, 0.01),
    np.arange(1, 1.21, 0.01),
    np.arange(1, 1.26, 0.01),
)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The original's `disk`: a normalised aliased disk (on a 17x17 grid) smoothed by cv2.GaussianBlur
    (ksize 3, sigma alias_blur, REFLECT_101), in float32; cropped to its non-zero support."""
    coords = np.arange(-8, 8 + 1) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = 3 if radius <= 8 else 5
    grid_x, grid_y = np.meshgrid(coords, coords)
    disk = np.array((grid_x**2 + grid_y**2) <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    offsets = np.arange(ksize) - (ksize - 1) * 0.5
    taps = np.exp(-0.5 / (alias_blur * alias_blur) * offsets**2).astype(np.float32)
    taps = (taps.astype(np.float64) / float(sum(float(tap) for tap in taps))).astype(np.float32)  # getGaussianKernel
    half = ksize // 2
    padded = np.pad(disk, half, mode="reflect")
    size = disk.shape[0]
    rows = sum(taps[k] * padded[:, k : k + size] for k in range(ksize))
    kernel = sum(taps[k] * rows[k : k + size, :] for k in range(ksize)).astype(np.float32)
    support = np.nonzero(kernel.any(axis=0))[0]
    reach = int(max(abs(support[0] - size // 2), abs(support[-1] - size // 2)))
    center = size // 2
    return kernel[center - reach : center + reach + 1, center - reach : center + reach + 1].astype(np.float64)


def defocus_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """cv2.filter2D with the anti-aliased disk kernel (REFLECT_101 border), float64."""
    radius, alias_blur = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[severity - 1]
    return to_uint8(correlate2d(to_unit(images), disk_kernel(radius, alias_blur), "mirror"))


def glass_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur, local pixel shuffling, Gaussian blur again.

    The original loops over pixels from bottom-right to top-left and "swaps" x[h, w] with
    x[h + dy, w + dx], dx, dy in randint(-1, 1) = {-1, 0}. Because numpy's x[h, w] is a view, that
    tuple assignment copies instead of swapping, and every read hits a not-yet-visited pixel, so one
    pass equals the parallel gather out[h, w] = in[h + dy, w + dx] for h, w in 2..H-1 done here
    (checked against the original loop with the same offsets).
    """
    sigma, iterations = ((0.05, 1), (0.25, 1), (0.4, 1), (0.25, 2), (0.4, 2))[severity - 1]
    unit = to_unit(images)
    count, channels, height, width = unit.shape
    shuffled = (gaussian_filter(unit, sigma) * 255.0).to(torch.uint8).reshape(count, channels, height * width)
    rows = torch.arange(height, device=unit.device)[:, None]
    cols = torch.arange(width, device=unit.device)[None, :]
    inner = (rows >= 2) & (cols >= 2)  # (H, W): pixels the loop visits
    for _ in range(iterations):
        shifts = torch.randint(-1, 1, (2, count, height, width), generator=generator, device=unit.device)
        source_rows = rows + torch.where(inner, shifts[1], 0)
        source_cols = cols + torch.where(inner, shifts[0], 0)
        index = (source_rows * width + source_cols).reshape(count, 1, -1).expand(-1, channels, -1)
        shuffled = shuffled.gather(2, index)
    shuffled_unit = shuffled.reshape(count, channels, height, width).to(torch.float64) / 255.0
    return to_uint8(gaussian_filter(shuffled_unit, sigma))


def motion_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """ImageMagick `motion_blur(radius, sigma, angle ~ U(-45, 45))` per image (see ops.magick_motion_blur)."""
    radius, sigma = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))[severity - 1]
    angles = uniform((images.shape[0],), -45.0, 45.0, generator)
    values = images.permute(0, 3, 1, 2).to(torch.float64)
    return values_to_uint8(magick_motion_blur(values, radius, sigma, angles))


@functools.lru_cache(maxsize=16)
def zoom_blur_operator(height: int, width: int, severity: int) -> np.ndarray:
    """(H*W, H*W) linear map of the whole zoom blur: (x + sum of clipped zooms) / (zooms + 1)."""
    factors = ZOOM_FACTORS[severity - 1]
    total = np.eye(height * width)
    for factor in factors:
        total += np.kron(clipped_zoom_matrix(height, factor), clipped_zoom_matrix(width, factor))
    return total / (len(factors) + 1)


def zoom_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Average of centre zooms (scipy.ndimage.zoom, order 1), as one (H*W, H*W) matrix product:
    float32 on CPU like the original, float64 on CUDA (immune to TF32 matmul settings)."""
    dtype = torch.float64 if images.is_cuda else torch.float32
    unit = to_unit(images, dtype)
    count, channels, height, width = unit.shape
    operator = torch.from_numpy(zoom_blur_operator(height, width, severity)).to(unit.device, dtype)
    blurred = unit.reshape(count * channels, height * width) @ operator.T
    return to_uint8(blurred.reshape(count, channels, height, width))


def gaussian_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """skimage.filters.gaussian (truncate 4, edge-replicate border), float64."""
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    return to_uint8(gaussian_filter(to_unit(images), sigma))
