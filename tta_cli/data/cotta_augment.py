"""CoTTA's test-time augmentation (Wang et al. 2022; cifar/cotta.py `get_tta_transforms`), made for a batch on its
device: every row gets its own random draws.

Per image, in the authors' order: colour jitter (brightness 0.6-1.4, contrast 0.7-1.3, saturation 0.5-1.5, hue
+-0.06, gamma 0.7-1.3, in a random order per image, as their ColorJitterPro draws one per call); edge padding by half
the image + random affine (rotation +-15 degrees, translation up to 1/16 of the padded size in whole pixels, scale
0.9-1.1, bilinear) + Gaussian blur (5 taps, sigma 0.001-0.5) + centre crop, done as one bilinear sample of the
un-padded image with edge clamping and a 2-pixel margin for the blur; horizontal flip (p 0.5); Gaussian noise
(std 0.005); clip to [0, 1]. Differences: the authors' torchvision transforms draw one set of parameters per call for
the whole batch, here each image draws its own; their edge padding ends at 16 pixels (black beyond), which only the
blur margin of the most extreme draws reaches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLUR_TAPS = 5


def cotta_augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, H, W): one augmented view of each row."""
    images = color_jitter(images.clamp(0, 1), generator)
    images = affine_blur(images, generator)
    flip = uniform(images, generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (images + 0.005 * noise).clamp(0, 1)


def uniform(like: torch.Tensor, generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """(B,) uniform draws in [low, high), one per row of `like`."""
    draws = torch.rand(like.shape[0], generator=generator, device=like.device, dtype=like.dtype)
    return low + (high - low) * draws


# ---- colour ---------------------------------------------------------------------------------------------------


def grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma, as torchvision's rgb_to_grayscale."""
    return (0.2989 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


def color_jitter(images: torch.Tensor, generator) -> torch.Tensor:
    factors = [uniform(images, generator, low, high).view(-1, 1, 1, 1) for low, high in JITTER_RANGES]
    order = torch.rand(images.shape[0], len(JITTER), generator=generator, device=images.device).argsort(1)  # (B, 5)
    for position in range(len(JITTER)):
        for index, (adjust, factor) in enumerate(zip(JITTER, factors, strict=True)):
            chosen = (order[:, position] == index).view(-1, 1, 1, 1)
            images = torch.where(chosen, adjust(images, factor), images)
    return images


def brightness(images, factor):
    return (images * factor).clamp(0, 1)


def contrast(images, factor):
    mean = grey(images).mean((1, 2, 3), keepdim=True)
    return (factor * images + (1 - factor) * mean).clamp(0, 1)


def saturation(images, factor):
    return (factor * images + (1 - factor) * grey(images)).clamp(0, 1)


def hue(images, shift):
    hue_, saturation_, value = rgb_to_hsv(images)
    return hsv_to_rgb((hue_ + shift[:, :, 0]) % 1.0, saturation_, value)


def gamma(images, exponent):
    return images.clamp(1e-8, 1) ** exponent  # (clamped first, as ColorJitterPro does)


JITTER = (brightness, contrast, saturation, hue, gamma)
JITTER_RANGES = ((0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3))


def rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) -> hue, saturation, value, each (B, H, W) in [0, 1]."""
    red, green, blue = images.unbind(1)
    high, low = images.amax(1), images.amin(1)
    spread = high - low
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    hue_ = torch.where(high == red, (green - blue) / safe, torch.where(high == green, 2 + (blue - red) / safe, 4 + (red - green) / safe))
    hue_ = torch.where(spread > 0, (hue_ / 6) % 1.0, torch.zeros_like(hue_))
    saturation_ = spread / torch.where(high > 0, high, torch.ones_like(high))
    return hue_, saturation_, high


def hsv_to_rgb(hue_: torch.Tensor, saturation_: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    sector = (hue_ * 6).floor()
    fraction = hue_ * 6 - sector
    sector = sector.long() % 6
    p = value * (1 - saturation_)
    q = value * (1 - saturation_ * fraction)
    t = value * (1 - saturation_ * (1 - fraction))
    table = torch.stack([  # (6 sectors, 3 channels, B, H, W)
        torch.stack([value, t, p]), torch.stack([q, value, p]), torch.stack([p, value, t]),
        torch.stack([p, q, value]), torch.stack([t, p, value]), torch.stack([value, p, q]),
    ])
    index = sector[None, None].expand(1, 3, *sector.shape)
    return table.gather(0, index)[0].permute(1, 0, 2, 3)


# ---- geometry and blur ----------------------------------------------------------------------------------------


def affine_blur(images: torch.Tensor, generator) -> torch.Tensor:
    """Edge pad + random affine about the centre + 5-tap Gaussian blur + centre crop, per image."""
    batch, _, height, width = images.shape
    margin = BLUR_TAPS // 2
    angle = uniform(images, generator, -15, 15) * math.pi / 180
    scale = uniform(images, generator, 0.9, 1.1)
    max_shift = [size * 2 / 16 for size in (width, height)]  # 1/16 of the padded (twice as large) image
    shift_x = uniform(images, generator, -max_shift[0], max_shift[0]).round()
    shift_y = uniform(images, generator, -max_shift[1], max_shift[1]).round()
    # output pixel centres of the crop and its blur margin, relative to the image centre: (H + 2m, W + 2m)
    ys = torch.arange(height + 2 * margin, device=images.device, dtype=images.dtype) - margin + 0.5 - height / 2
    xs = torch.arange(width + 2 * margin, device=images.device, dtype=images.dtype) - margin + 0.5 - width / 2
    out_y, out_x = ys.view(1, -1, 1) - shift_y.view(-1, 1, 1), xs.view(1, 1, -1) - shift_x.view(-1, 1, 1)
    cos, sin, scale = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1), scale.view(-1, 1, 1)
    in_x = (cos * out_x + sin * out_y) / scale  # the inverse map: output -> input, about the centre
    in_y = (-sin * out_x + cos * out_y) / scale
    grid = torch.stack([2 * in_x / width, 2 * in_y / height], -1)  # grid_sample's [-1, 1], align_corners=False
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return gaussian_blur(warped, uniform(images, generator, 0.001, 0.5))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(B, C, H + 4, W + 4) -> (B, C, H, W): a separable 5-tap Gaussian of standard deviation sigma[b] per image."""
    batch, channels = images.shape[:2]
    taps = torch.arange(BLUR_TAPS, device=images.device, dtype=images.dtype) - BLUR_TAPS // 2
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (B * C, 5)
    flat = images.reshape(1, batch * channels, *images.shape[2:])
    flat = F.conv2d(flat, kernel.view(-1, 1, BLUR_TAPS, 1), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, BLUR_TAPS), groups=batch * channels)
    return flat.view(batch, channels, *flat.shape[2:])
