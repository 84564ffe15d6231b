"""Weather corruptions (snow, frost, fog, spatter) with the CIFAR-10-C parameters, batched."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tta_cli.corrupt.ops import (
    clipped_zoom_matrix,
    correlate1d,
    gaussian_filter,
    magick_motion_blur,
    map_border,
    normal,
    to_uint8,
    to_unit,
    uniform,
)
from tta_cli.errors import TTAError

ASSETS = Path(__file__).parent / "assets"
# The generator draws np.random.randint(5): frost1..frost5 (its sixth image is never used).
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.png", "frost5.png")


def snow(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Zoomed Gaussian snow layer, thresholded, motion-blurred (ImageMagick, angle ~ U(-135, -45)),
    added twice (as is and rotated 180 degrees) to a whitened image."""
    loc, scale, zoom, threshold, blur_radius, blur_sigma, blend = (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )[severity - 1]
    unit = to_unit(images, torch.float32)
    count, _, height, width = unit.shape
    layer = normal((count, height, width), loc, scale, generator)  # (N, H, W)
    zoom_rows = torch.from_numpy(clipped_zoom_matrix(height, zoom)).to(unit.device)
    zoom_cols = torch.from_numpy(clipped_zoom_matrix(width, zoom)).to(unit.device)
    layer = zoom_rows @ layer @ zoom_cols.T
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = (layer.clamp(0.0, 1.0) * 255.0).to(torch.uint8).to(torch.float64)
    angles = uniform((count,), -135.0, -45.0, generator)
    layer = magick_motion_blur(layer[:, None], blur_radius, blur_sigma, angles) / 255.0  # (N, 1, H, W)
    gray = 0.299 * unit[:, 0:1] + 0.587 * unit[:, 1:2] + 0.114 * unit[:, 2:3]
    whitened = blend * unit + (1 - blend) * torch.maximum(unit, gray * 1.5 + 0.5)
    return to_uint8(whitened.to(torch.float64) + layer + layer.flip(-2, -1))


@functools.lru_cache(maxsize=1)
def frost_layers() -> tuple[torch.Tensor, torch.Tensor]:
    """The five frost photographs, already resized by 0.2 like the generator: (5, Hmax, Wmax, 3)
    uint8 zero-padded, and their (height, width) as (5, 2)."""
    pictures = [np.asarray(Image.open(ASSETS / name).convert("RGB")) for name in FROST_FILES]
    max_height = max(p.shape[0] for p in pictures)
    max_width = max(p.shape[1] for p in pictures)
    stacked = np.zeros((len(pictures), max_height, max_width, 3), dtype=np.uint8)
    for slot, picture in enumerate(pictures):
        stacked[slot, : picture.shape[0], : picture.shape[1]] = picture
    sizes = torch.tensor([p.shape[:2] for p in pictures], dtype=torch.int64)
    return torch.from_numpy(stacked), sizes


def frost(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """c0 * x + c1 * (random crop of a random frost photograph), clipped to 0..255, truncated."""
    image_weight, frost_weight = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[severity - 1]
    count, height, width, _ = images.shape
    stacked, sizes = frost_layers()
    if height >= int(sizes[:, 0].min()) or width >= int(sizes[:, 1].min()):
        raise TTAError(
            f"frost crops the CIFAR frost photographs, so images must be smaller than "
            f"{int(sizes[:, 0].min())}x{int(sizes[:, 1].min())} pixels; got {height}x{width}"
        )
    device = images.device
    stacked, sizes = stacked.to(device), sizes.to(device)
    choice = torch.randint(0, len(FROST_FILES), (count,), generator=generator, device=device)
    top = (torch.rand(count, generator=generator, device=device, dtype=torch.float64) * (sizes[choice, 0] - height)).long()
    left = (torch.rand(count, generator=generator, device=device, dtype=torch.float64) * (sizes[choice, 1] - width)).long()
    rows = top[:, None] + torch.arange(height, device=device)[None, :]  # (N, H)
    cols = left[:, None] + torch.arange(width, device=device)[None, :]  # (N, W)
    crops = stacked[choice[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N, H, W, 3)
    mixed = image_weight * images.to(torch.float64) + frost_weight * crops.to(torch.float64)
    return mixed.clamp(0.0, 255.0).to(torch.uint8)


def plasma_fractal(count: int, mapsize: int, wibble_decay: float, generator: torch.Generator) -> torch.Tensor:
    """Diamond-square height maps (N, mapsize, mapsize) in [0, 1], one per image, as the original's
    `plasma_fractal` (wibble starts at 100, random term wibble * U(-wibble, wibble))."""
    maps = torch.zeros(count, mapsize, mapsize, dtype=torch.float64, device=generator.device)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        return total / 4 + wibble * uniform(tuple(total.shape), -wibble, wibble, generator)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        square_sum = corners + corners.roll(-1, dims=1)
        square_sum = square_sum + square_sum.roll(-1, dims=2)
        maps[:, half::step, half::step] = wibbled_mean(square_sum)
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        left_sum = centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        maps[:, 0::step, half::step] = wibbled_mean(left_sum)
        top_sum = centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        maps[:, half::step, 0::step] = wibbled_mean(top_sum)
        step //= 2
        wibble /= wibble_decay
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    return maps / maps.amax(dim=(1, 2), keepdim=True)


def fog(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Add a plasma fractal, then rescale by max / (max + strength)."""
    strength, wibble_decay = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[severity - 1]
    unit = to_unit(images)
    count, _, height, width = unit.shape
    mapsize = max(32, 1 << (max(height, width) - 1).bit_length())
    plasma = plasma_fractal(count, mapsize, wibble_decay, generator)[:, None, :height, :width]
    max_value = unit.amax(dim=(1, 2, 3), keepdim=True)
    return to_uint8((unit + strength * plasma) * max_value / (max_value + strength))


def _canny(gray: torch.Tensor, low: int = 50, high: int = 150) -> torch.Tensor:
    """cv2.Canny(gray, low, high) on integer images (N, H, W): 3x3 Sobel (edge replicate), L1
    magnitude, OpenCV's fixed-point 4-direction non-maximum suppression, 8-connected hysteresis."""
    height, width = gray.shape[-2:]
    rows = map_border(torch.arange(-1, height + 1, device=gray.device), height, "nearest")
    cols = map_border(torch.arange(-1, width + 1, device=gray.device), width, "nearest")
    padded = gray.index_select(1, rows).index_select(2, cols)

    def at(dr: int, dc: int, source: torch.Tensor = padded) -> torch.Tensor:
        return source[:, 1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width]

    grad_x = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    grad_y = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    magnitude = grad_x.abs() + grad_y.abs()
    mag = F.pad(magnitude, (1, 1, 1, 1))  # zeros outside, as OpenCV's magnitude buffer
    abs_x = grad_x.abs()
    scaled_y = grad_y.abs() << 15
    tan22 = abs_x * 13573  # round(tan(22.5 deg) * 2^15)
    tan67 = tan22 + (abs_x << 16)
    horizontal = scaled_y < tan22
    vertical = ~horizontal & (scaled_y > tan67)
    keep_horizontal = (magnitude > at(0, -1, mag)) & (magnitude >= at(0, 1, mag))
    keep_vertical = (magnitude > at(-1, 0, mag)) & (magnitude >= at(1, 0, mag))
    same_sign = (grad_x < 0) == (grad_y < 0)
    keep_diagonal = torch.where(
        same_sign,
        (magnitude > at(-1, -1, mag)) & (magnitude > at(1, 1, mag)),
        (magnitude > at(-1, 1, mag)) & (magnitude > at(1, -1, mag)),
    )
    candidate = (magnitude > low) & torch.where(horizontal, keep_horizontal, torch.where(vertical, keep_vertical, keep_diagonal))
    edges = candidate & (magnitude > high)
    for _ in range(height * width):
        grown = candidate & (F.max_pool2d(edges[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def _chamfer_distance(edges: torch.Tensor, limit: float = 20.0) -> torch.Tensor:
    """cv2.distanceTransform(255 - canny, DIST_L2, 5) truncated at `limit`: the 5x5 chamfer metric
    (1, 1.4, 2.1969 in 16-bit fixed point), by relaxation; every path below the limit has at most
    `limit` steps, so that many rounds are exact."""
    steps = {(0, 1): 65536, (1, 1): 91750, (1, 2): 143976}
    moves = []
    for (a, b), cost in steps.items():
        for dr, dc in {(a, b), (b, a), (-a, b), (b, -a), (a, -b), (-b, a), (-a, -b), (-b, -a)}:
            moves.append((dr, dc, cost))
    big = 1 << 40
    height, width = edges.shape[-2:]
    distance = torch.where(edges, 0, big).to(torch.int64)
    for _ in range(int(limit) + 1):
        padded = F.pad(distance, (2, 2, 2, 2), value=big)
        for dr, dc, cost in moves:
            distance = torch.minimum(distance, padded[:, 2 + dr : 2 + dr + height, 2 + dc : 2 + dc + width] + cost)
    return (distance.to(torch.float32) * (1.0 / 65536)).clamp(max=limit)


def _box3(values: torch.Tensor) -> torch.Tensor:
    """cv2.blur(x, (3, 3)) sum (REFLECT_101 border) before normalisation, float64."""
    taps = [1.0, 1.0, 1.0]
    return correlate1d(correlate1d(values.to(torch.float64), taps, -2, "mirror"), taps, -1, "mirror")


def _equalize_hist(values: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist per image on integer values (N, H, W) in 0..255."""
    count = values.shape[0]
    flat = values.reshape(count, -1).long()
    total = flat.shape[1]
    hist = torch.zeros(count, 256, dtype=torch.int64, device=values.device).scatter_add_(1, flat, torch.ones_like(flat))
    first = (hist > 0).long().argmax(1, keepdim=True)  # (N, 1) lowest present value
    first_count = hist.gather(1, first)
    bins = torch.arange(256, device=values.device)[None, :]
    cumulative = torch.cumsum(torch.where(bins > first, hist, 0), 1)
    scale = 255.0 / (total - first_count).clamp(min=1).to(torch.float32)
    lut = torch.round(cumulative.to(torch.float32) * scale).clamp(0, 255)
    lut = torch.where(bins < first, 0.0, lut)
    lut = torch.where(first_count == total, first.to(lut.dtype).expand(-1, 256), lut)
    return lut.gather(1, flat).reshape(values.shape)


def spatter(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Water drops (severities 1-3: Canny / distance transform / emboss shading in pale turquoise)
    or mud (4-5: blurred blobs in brown) from a thresholded, blurred Gaussian liquid layer."""
    loc, scale, sigma, threshold, intensity, mud = (
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    )[severity - 1]
    unit = to_unit(images, torch.float32)
    count, _, height, width = unit.shape
    liquid = gaussian_filter(normal((count, height, width), loc, scale, generator), sigma)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if not mud:
        # (liquid * 255).astype(np.uint8): truncation, wrapping above 255 as numpy does.
        liquid_u8 = torch.remainder(torch.trunc(liquid * 255.0).long(), 256)
        distance = _chamfer_distance(_canny(liquid_u8))
        distance = (_box3(distance) * (1.0 / 9.0)).to(torch.float32).to(torch.uint8)
        distance = _equalize_hist(distance)
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        rows = map_border(torch.arange(-1, height + 1, device=unit.device), height, "mirror")
        cols = map_border(torch.arange(-1, width + 1, device=unit.device), width, "mirror")
        padded = distance.to(torch.float64).index_select(1, rows).index_select(2, cols)
        embossed = sum(float(emboss[i, j]) * padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3) if emboss[i, j])
        embossed = torch.round(embossed).clamp(0, 255)
        shading = torch.round(_box3(embossed) / 9.0).clamp(0, 255).to(torch.float32)
        mask = liquid_u8.to(torch.float32) * shading  # (N, H, W)
        peak = mask.amax(dim=(1, 2), keepdim=True)
        mask = torch.where(peak > 0, mask / torch.where(peak > 0, peak, 1.0), 0.0) * intensity
        color = torch.tensor([175 / 255.0, 238 / 255.0, 238 / 255.0], device=unit.device, dtype=torch.float32)
        return to_uint8(unit + mask[:, None] * color[None, :, None, None])
    blobs = gaussian_filter((liquid > threshold).to(torch.float32), intensity)
    blobs = torch.where(blobs < 0.8, torch.zeros_like(blobs), blobs)[:, None]
    color = torch.tensor([63 / 255.0, 42 / 255.0, 20 / 255.0], device=unit.device, dtype=torch.float32)
    return to_uint8(unit * (1 - blobs) + color[None, :, None, None] * blobs)
