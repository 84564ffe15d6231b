"""Batched building blocks that reproduce the numpy/scipy/skimage/OpenCV/ImageMagick/PIL steps of
the CIFAR-10-C generator in PyTorch: unit conversion, border modes, Gaussian filters, bilinear
sampling, zoom matrices, ImageMagick motion blur, PIL box resizing and skimage HSV."""

from __future__ import annotations

import math

import numpy as np
import torch


def to_unit(images: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], the original's `np.array(x) / 255.`."""
    return images.permute(0, 3, 1, 2).to(dtype) / 255.0


def to_uint8(unit: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) -> uint8 (N, H, W, 3) as `np.uint8(np.clip(x, 0, 1) * 255)` (truncation)."""
    return (unit.clamp(0.0, 1.0) * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def values_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) in 0..255 -> uint8 (N, H, W, 3), clipping then truncating like `np.uint8`."""
    return values.clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def map_border(index: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Map integer coordinates outside [0, size) back inside.

    nearest: edge replicate (scipy 'nearest', cv2 REPLICATE, ImageMagick edge);
    reflect: d c b a | a b c d (scipy 'reflect', cv2 REFLECT);
    mirror: d c b | a b c d (scipy 'mirror', cv2 REFLECT_101, the cv2 default).
    """
    if mode == "nearest" or size == 1:
        return index.clamp(0, size - 1)
    if mode == "reflect":
        period = 2 * size
        index = index % period
        return torch.where(index >= size, period - 1 - index, index)
    if mode == "mirror":
        period = 2 * size - 2
        index = index % period
        return torch.where(index >= size, period - index, index)
    raise ValueError(f"unknown border mode {mode!r}")


def correlate1d(x: torch.Tensor, taps: list[float], dim: int, mode: str) -> torch.Tensor:
    """Correlate `x` with an odd-length 1-D kernel along `dim`, padding by `mode` (see map_border).

    Symmetric kernels are summed as scipy.ndimage.correlate1d does, centre first then the pairs
    from the outside in, so float64 results round the same way.
    """
    radius = (len(taps) - 1) // 2
    size = x.shape[dim]
    index = map_border(torch.arange(-radius, size + radius, device=x.device), size, mode)
    padded = x.index_select(dim, index)

    def shifted(offset: int) -> torch.Tensor:
        return padded.narrow(dim, radius + offset, size)

    if taps == taps[::-1]:
        out = shifted(0) * taps[radius]
        for offset in range(radius, 0, -1):
            out = out + (shifted(-offset) + shifted(offset)) * taps[radius - offset]
        return out
    out = shifted(-radius) * taps[0]
    for position, weight in enumerate(taps[1:], start=1):
        out = out + shifted(position - radius) * weight
    return out


def correlate2d(x: torch.Tensor, kernel: np.ndarray, mode: str) -> torch.Tensor:
    """Correlate the last two dims of `x` with a small odd-sized 2-D kernel (cv2.filter2D semantics)."""
    return cache_sized(_correlate2d, x, kernel, mode)


def _correlate2d(x: torch.Tensor, kernel: np.ndarray, mode: str) -> torch.Tensor:
    kernel_h, kernel_w = kernel.shape
    radius_h, radius_w = kernel_h // 2, kernel_w // 2
    height, width = x.shape[-2:]
    rows = map_border(torch.arange(-radius_h, height + radius_h, device=x.device), height, mode)
    cols = map_border(torch.arange(-radius_w, width + radius_w, device=x.device), width, mode)
    padded = x.index_select(-2, rows).index_select(-1, cols)
    out = torch.zeros_like(x)
    for i in range(kernel_h):
        for j in range(kernel_w):
            if kernel[i, j] != 0:
                out = out + padded[..., i : i + height, j : j + width] * float(kernel[i, j])
    return out


def gaussian_taps(sigma: float, truncate: float = 4.0) -> list[float]:
    """scipy.ndimage.gaussian_filter1d weights: radius int(truncate * sigma + 0.5), normalised."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / (sigma * sigma) * offsets**2)
    return (weights / weights.sum()).tolist()


def cache_sized(function, x: torch.Tensor, *args, images: int = 256):
    """Run a memory-bound per-image op in chunks of `images` on the CPU, so that its temporaries fit in the cache;
    on CUDA the whole batch at once."""
    if x.is_cuda or x.shape[0] <= images:
        return function(x, *args)
    return torch.cat([function(chunk, *args) for chunk in x.split(images)])


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian over the last two dims (rows then columns, as scipy does)."""
    if sigma <= 1e-15:
        return x
    taps = gaussian_taps(sigma, truncate)
    return cache_sized(lambda part: correlate1d(correlate1d(part, taps, -2, mode), taps, -1, mode), x)


def gather_bilinear(
    images: torch.Tensor, row0: torch.Tensor, col0: torch.Tensor, row_frac: torch.Tensor, col_frac: torch.Tensor, mode: str
) -> torch.Tensor:
    """Bilinear sample of images (N, C, H, W) at per-pixel positions (N, H', W'); each of the four
    neighbours is mapped back inside the image by `mode` (what scipy and cv2 remap do)."""
    count, channels, height, width = images.shape
    flat = images.reshape(count, channels, height * width)
    rows = (map_border(row0, height, mode), map_border(row0 + 1, height, mode))
    cols = (map_border(col0, width, mode), map_border(col0 + 1, width, mode))
    row_weights = (1.0 - row_frac, row_frac)
    col_weights = (1.0 - col_frac, col_frac)
    out = None
    for row, row_weight in zip(rows, row_weights, strict=True):
        for col, col_weight in zip(cols, col_weights, strict=True):
            index = (row * width + col).reshape(count, 1, -1).expand(-1, channels, -1)
            weight = (row_weight * col_weight).reshape(count, 1, *row0.shape[1:]).to(images.dtype)
            part = flat.gather(2, index).reshape(count, channels, *row0.shape[1:]) * weight
            out = part if out is None else out + part
    return out


def clipped_zoom_matrix(size: int, zoom_factor: float) -> np.ndarray:
    """(size, size) matrix of the original's `clipped_zoom` along one axis: centre crop of
    ceil(size / zoom) pixels, scipy.ndimage.zoom(order=1) (corner-aligned), centre trim back to size."""
    crop = int(np.ceil(size / zoom_factor))
    top = (size - crop) // 2
    zoomed = int(round(crop * zoom_factor))
    step = (crop - 1) / (zoomed - 1) if zoomed > 1 else 0.0
    trim = (zoomed - size) // 2
    coords = np.arange(trim, trim + size, dtype=np.float64) * step
    low = np.clip(np.floor(coords).astype(np.int64), 0, crop - 1)
    frac = coords - low
    high = np.clip(low + 1, 0, crop - 1)
    matrix = np.zeros((size, size), dtype=np.float64)
    rows = np.arange(size)
    np.add.at(matrix, (rows, top + low), 1.0 - frac)
    np.add.at(matrix, (rows, top + high), frac)
    return matrix


def magick_motion_blur(values: torch.Tensor, radius: float, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """ImageMagick MotionBlurImage on values (N, C, H, W) in 0..255 with one angle (degrees) per image.

    As in MagickCore/effect.c: width = 2 * ceil(radius) + 1 taps, weights exp(-i^2 / 2 sigma^2) for
    i = 0..width-1 (one-sided), tap i reads pixel (x + ceil(i cos a - 0.5), y + ceil(i sin a - 0.5))
    with edge replication; the sum is rounded to the 16-bit quantum, and the 8-bit PNG export
    truncates. Bit-identical to Wand + ImageMagick 6.9.11 Q16 on 1,000 CIFAR images at the same angles.
    """
    count, channels, height, width = values.shape
    taps = 2 * math.ceil(radius) + 1
    weights = np.exp(-(np.arange(taps, dtype=np.float64) ** 2) / (2.0 * sigma * sigma))
    weights = (weights / weights.sum()).tolist()
    radians = angles.to(torch.float64) * (math.pi / 180.0)
    along_x = taps * torch.sin(radians)
    along_y = taps * torch.cos(radians)
    length = torch.hypot(along_x, along_y)
    steps = torch.arange(taps, device=values.device, dtype=torch.float64)
    offset_cols = torch.ceil(steps[None, :] * along_y[:, None] / length[:, None] - 0.5).long()  # (N, taps)
    offset_rows = torch.ceil(steps[None, :] * along_x[:, None] / length[:, None] - 0.5).long()
    rows = torch.arange(height, device=values.device)
    cols = torch.arange(width, device=values.device)
    flat = values.reshape(count, channels, height * width)
    out = torch.zeros_like(flat)
    for tap, weight in enumerate(weights):
        tap_rows = (rows[None, :] + offset_rows[:, tap : tap + 1]).clamp(0, height - 1)  # (N, H)
        tap_cols = (cols[None, :] + offset_cols[:, tap : tap + 1]).clamp(0, width - 1)  # (N, W)
        index = (tap_rows[:, :, None] * width + tap_cols[:, None, :]).reshape(count, 1, -1)
        out = out + flat.gather(2, index.expand(-1, channels, -1)) * weight
    quantum = torch.floor(out * 257.0 + 0.5)  # ClampToQuantum in ImageMagick's 16-bit quantum
    return torch.floor(quantum / 257.0).clamp(0.0, 255.0).reshape(count, channels, height, width)


def pil_box_weights(in_size: int, out_size: int) -> np.ndarray:
    """PIL's BOX resampling coefficients (out_size, in_size) in its 22-bit fixed point (ImagingResample)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        taps = np.array([(j - center + 0.5) / filter_scale for j in range(first, last)])
        box = ((taps > -0.5) & (taps <= 0.5)).astype(np.float64)
        if box.sum() != 0:
            box /= box.sum()
        weights[out_index, first:last] = box
    return np.where(weights < 0, np.trunc(-0.5 + weights * (1 << 22)), np.trunc(0.5 + weights * (1 << 22)))


def pil_resize_box(values: torch.Tensor, out_height: int, out_width: int) -> torch.Tensor:
    """PIL `Image.resize(size, BOX)` on integer values (N, C, H, W): horizontal pass then vertical,
    each rounding to uint8 in 22-bit fixed point; float64 holds the integer sums exactly."""
    height, width = values.shape[-2:]
    half = float(1 << 21)
    unit = float(1 << 22)
    if out_width != width:
        weights = torch.from_numpy(pil_box_weights(width, out_width)).to(values.device)
        values = torch.floor((values @ weights.T + half) / unit).clamp(0.0, 255.0)
    if out_height != height:
        weights = torch.from_numpy(pil_box_weights(height, out_height)).to(values.device)
        values = torch.floor((weights @ values + half) / unit).clamp(0.0, 255.0)
    return values


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """skimage.color.rgb2hsv on (N, 3, H, W): blue wins hue ties over green over red, as skimage does."""
    red, green, blue = rgb.unbind(1)
    value = rgb.amax(1)
    delta = value - rgb.amin(1)
    flat = delta == 0
    safe_delta = torch.where(flat, torch.ones_like(delta), delta)
    safe_value = torch.where(value == 0, torch.ones_like(value), value)
    saturation = torch.where(flat, torch.zeros_like(delta), delta / safe_value)
    hue = torch.where(
        blue == value,
        4.0 + (red - green) / safe_delta,
        torch.where(green == value, 2.0 + (blue - red) / safe_delta, (green - blue) / safe_delta),
    )
    hue = torch.remainder(hue / 6.0, 1.0)
    hue = torch.where(flat, torch.zeros_like(hue), hue)
    return torch.stack((hue, saturation, value), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """skimage.color.hsv2rgb on (N, 3, H, W)."""
    hue, saturation, value = hsv.unbind(1)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - frac * saturation)
    t = value * (1.0 - (1.0 - frac) * saturation)
    sector = torch.remainder(sector.long(), 6)[None]  # (1, N, H, W)
    red = torch.stack((value, q, p, p, t, value)).gather(0, sector)[0]
    green = torch.stack((t, value, value, q, p, p)).gather(0, sector)[0]
    blue = torch.stack((p, p, t, value, value, q)).gather(0, sector)[0]
    return torch.stack((red, green, blue), 1)


def uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """numpy.random.uniform(low, high, shape) from a torch generator on the generator's device."""
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)


def normal(shape: tuple[int, ...], loc: float, scale: float, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """numpy.random.normal(loc, scale, shape) from a torch generator."""
    return loc + scale * torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
