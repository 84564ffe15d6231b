"""Noise corruptions with the CIFAR-10-C parameters (Hendrycks & Dietterich 2019, make_cifar_c.py):
float64 maths on x / 255, clip to [0, 1], * 255, truncation to uint8, as the original."""

from __future__ import annotations

import torch

from tta_cli.corrupt.ops import to_uint8, to_unit


def gaussian_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Additive N(0, std) noise per channel value."""
    std = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    unit = to_unit(images)
    noise = torch.randn(unit.shape, generator=generator, device=unit.device, dtype=unit.dtype)
    return to_uint8(unit + noise * std)


def shot_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Poisson photon noise: poisson(x * rate) / rate."""
    rate = (500, 250, 100, 75, 50)[severity - 1]
    unit = to_unit(images)
    return to_uint8(torch.poisson(unit * rate, generator=generator) / rate)


def impulse_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Salt and pepper as skimage.util.random_noise(mode='s&p'): each channel value flips with
    probability `amount`, to 1 or 0 with equal odds."""
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    unit = to_unit(images)
    flipped = torch.rand(unit.shape, generator=generator, device=unit.device, dtype=unit.dtype) <= amount
    salted = torch.rand(unit.shape, generator=generator, device=unit.device, dtype=unit.dtype) <= 0.5
    unit = torch.where(flipped & salted, torch.ones_like(unit), unit)
    unit = torch.where(flipped & ~salted, torch.zeros_like(unit), unit)
    return to_uint8(unit)


def speckle_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Multiplicative noise: x + x * N(0, std)."""
    std = (0.06, 0.1, 0.12, 0.16, 0.2)[severity - 1]
    unit = to_unit(images)
    noise = torch.randn(unit.shape, generator=generator, device=unit.device, dtype=unit.dtype)
    return to_uint8(unit + unit * noise * std)
