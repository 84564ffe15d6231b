"""AugMix views as MEMO's CIFAR code draws them (Zhang et al. 2022; cifar-10-exps/utils/third_party.py), made for a
batch on its device: every row gets its own random draws, with no per-image Python loop.

A view of image x: random crop (4-pixel zero padding) + horizontal flip gives x0; then
`m * x0 + (1 - m) * sum_i w_i chain_i(x0)` with w ~ Dirichlet(1, 1, 1), m ~ Beta(1, 1), and three chains of 1-3
operations, each drawn uniformly from nine at a level drawn uniformly from [0.1, 1] as the authors' `rand_lvl(1)`:
autocontrast, equalize, rotate (int(3 level) degrees), solarize (threshold 256 - int(25.6 level)), shear x / y
(0.03 level), translate x / y (int(1.07 level) pixels), posterize (4 bits); rotations, shears and translations get a
random sign. Differences from the PIL original: pixels stay float between operations (PIL rounds to uint8 after each;
equalize, solarize and posterize read them as rounded 8-bit values, and then match PIL exactly); geometric operations
sample bilinearly with grid_sample and match PIL inside the image, but a border pixel whose sample point falls just
outside blends with the grey fill (128/255) where PIL fills it whole. Mixing happens in [0, 1] pixel space: the
authors mix after a per-channel affine normalisation, which commutes with a mix whose weights sum to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tta_cli.data.augment import random_crop_flip

GREY = 128 / 255  # PIL's fillcolor=128
CHAINS = 3  # mixed chains per view
MAX_DEPTH = 3  # operations per chain: 1 to 3


def augmix(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, H, W): one AugMix view of each row, drawn independently per row."""
    batch = images.shape[0]
    start = random_crop_flip(images, 4, generator)
    chain_weights = -uniform((batch, CHAINS), images, generator).clamp_min(1e-12).log()  # Exp(1) draws ...
    chain_weights = chain_weights / chain_weights.sum(1, keepdim=True)  # ... normalised: Dirichlet(1, 1, 1)
    keep = uniform((batch,), images, generator).view(-1, 1, 1, 1)  # Beta(1, 1)
    mixed = torch.zeros_like(start)
    for chain in range(CHAINS):
        mixed += chain_weights[:, chain].view(-1, 1, 1, 1) * operation_chain(start, generator)
    return (keep * start + (1 - keep) * mixed).clamp(0, 1)  # (clamp: rounding error only)


def operation_chain(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Each row through its own 1-3 randomly chosen operations."""
    batch, device = images.shape[0], images.device
    depth = torch.randint(1, MAX_DEPTH + 1, (batch,), generator=generator, device=device)
    for position in range(MAX_DEPTH):
        chosen = torch.randint(0, len(OPERATIONS), (batch,), generator=generator, device=device)
        level = 0.1 + 0.9 * uniform((batch,), images, generator)
        sign = torch.where(uniform((batch,), images, generator) > 0.5, 1.0, -1.0).to(images.dtype)
        active = position < depth
        for index, operation in enumerate(OPERATIONS):  # every operation on the whole batch, kept where chosen
            selected = (active & (chosen == index)).view(-1, 1, 1, 1)
            images = torch.where(selected, operation(images, level, sign), images)
    return images


def uniform(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def as_bytes(images: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> the 8-bit values PIL would hold, as floats 0..255."""
    return (images * 255).round().clamp(0, 255)


# ---- the nine operations: (B, 3, H, W) images, (B,) levels in [0.1, 1], (B,) signs -> (B, 3, H, W) ----------

def autocontrast(images, level, sign):
    """Stretch each channel to the full [0, 1] range (PIL's ImageOps.autocontrast, cutoff 0)."""
    low = images.amin((2, 3), keepdim=True)
    high = images.amax((2, 3), keepdim=True)
    spread = high - low
    stretched = (images - low) / spread.clamp_min(1e-12)
    return torch.where(spread > 0, stretched, images)


def equalize(images, level, sign):
    """Histogram equalisation per channel, with PIL's look-up table (ImageOps.equalize)."""
    batch, channels, height, width = images.shape
    values = as_bytes(images).long().flatten(2)  # (B, C, HW)
    histogram = torch.zeros(batch, channels, 256, device=images.device, dtype=torch.long)
    histogram.scatter_add_(2, values, torch.ones_like(values))
    last_used = 255 - (histogram.flip(2) > 0).long().argmax(2, keepdim=True)  # the brightest value present
    step = (height * width - histogram.gather(2, last_used)) // 255  # (B, C, 1)
    below = histogram.cumsum(2) - histogram  # pixels darker than each value
    table = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    equalized = table.gather(2, values).view_as(images).to(images.dtype) / 255
    unchanged = (step == 0) | ((histogram > 0).sum(2, keepdim=True) <= 1)
    return torch.where(unchanged.view(batch, channels, 1, 1), images, equalized)


def solarize(images, level, sign):
    """Invert the pixels at or above 256 - int(25.6 level) of 255."""
    threshold = 256 - (level * 25.6).floor()
    return torch.where(as_bytes(images) >= threshold.view(-1, 1, 1, 1), 1 - images, images)


def posterize(images, level, sign):
    """Keep the top 4 - int(0.4 level) bits (4 for every level MEMO draws)."""
    bits = 4 - (level * 0.4).floor()
    bucket = (2 ** (8 - bits)).view(-1, 1, 1, 1)
    return (as_bytes(images) / bucket).floor() * bucket / 255


def rotate(images, level, sign):
    """Rotate about the centre by int(3 level) degrees."""
    radians = sign * (level * 3).floor() * math.pi / 180
    cos, sin = radians.cos(), radians.sin()
    height, width = images.shape[-2:]
    centre_x, centre_y = width / 2, height / 2
    matrix = torch.stack([
        torch.stack([cos, sin, centre_x - cos * centre_x - sin * centre_y], 1),
        torch.stack([-sin, cos, centre_y + sin * centre_x - cos * centre_y], 1),
    ], 1)
    return warp(images, matrix)


def shear_x(images, level, sign):
    return warp(images, pixel_matrix(level, a=1, b=sign * level * 0.03, e=1))


def shear_y(images, level, sign):
    return warp(images, pixel_matrix(level, a=1, d=sign * level * 0.03, e=1))


def translate_x(images, level, sign):
    return warp(images, pixel_matrix(level, a=1, c=sign * (level * 32 / 30).floor(), e=1))


def translate_y(images, level, sign):
    return warp(images, pixel_matrix(level, a=1, e=1, f=sign * (level * 32 / 30).floor()))


OPERATIONS = (autocontrast, equalize, rotate, solarize, shear_x, shear_y, translate_x, translate_y, posterize)


def pixel_matrix(like: torch.Tensor, a=0.0, b=0.0, c=0.0, d=0.0, e=0.0, f=0.0) -> torch.Tensor:
    """(B, 2, 3) PIL AFFINE data (a, b, c, d, e, f): output pixel (x, y) samples input (a x + b y + c, d x + e y + f)."""
    rows = [torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like) for value in (a, b, c, d, e, f)]
    return torch.stack(rows, 1).view(-1, 2, 3)


def warp(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Sample each image through its (2, 3) pixel-space output->input affine map; grey outside, bilinear inside."""
    height, width = images.shape[-2:]
    a, b, c = matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 0, 2]
    d, e, f = matrix[:, 1, 0], matrix[:, 1, 1], matrix[:, 1, 2]
    ratio = height / width  # pixel coordinates (origin top-left) -> grid_sample's [-1, 1] (align_corners=False)
    theta = torch.stack([
        torch.stack([a, b * ratio, a + b * ratio + 2 * c / width - 1], 1),
        torch.stack([d / ratio, e, d / ratio + e + 2 * f / height - 1], 1),
    ], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images - GREY, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + GREY
