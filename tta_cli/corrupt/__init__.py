"""CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) as batched PyTorch ops on any device.

Each corruption is `fn(images uint8 (N, H, W, 3), severity 1..5, generator) -> uint8 (N, H, W, 3)`,
implemented from the published CIFAR parameters of `make_cifar_c.py` (hendrycks/robustness) and
registered below by name. `corrupt()` validates input and seeds the generator.

The ops follow the original functions' arithmetic (their rounding, fixed point and summation order), so that with
the same random draws they give the same uint8 pixels up to float32 summation order; the noises can only match in
distribution (torch and numpy generators differ). The comparison against the original functions needs their
environment (numpy, scipy, scikit-image, OpenCV, Wand + ImageMagick, PIL), so it is not in the test suite; its
outcome is in docs/lab-notes.md.
OpenCV >= 4.11 samples warpAffine at float coordinates; elastic_transform follows <= 4.10 (1/32 pixel).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch

from tta_cli.corrupt import blur, digital, noise, weather
from tta_cli.errors import TTAError

CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
REGISTRY: dict[str, Corruption] = {
    "gaussian_noise": noise.gaussian_noise,
    "shot_noise": noise.shot_noise,
    "impulse_noise": noise.impulse_noise,
    "defocus_blur": blur.defocus_blur,
    "glass_blur": blur.glass_blur,
    "motion_blur": blur.motion_blur,
    "zoom_blur": blur.zoom_blur,
    "snow": weather.snow,
    "frost": weather.frost,
    "fog": weather.fog,
    "brightness": digital.brightness,
    "contrast": digital.contrast,
    "elastic_transform": digital.elastic_transform,
    "pixelate": digital.pixelate,
    "jpeg_compression": digital.jpeg_compression,
    "speckle_noise": noise.speckle_noise,
    "gaussian_blur": blur.gaussian_blur,
    "spatter": weather.spatter,
    "saturate": digital.saturate,
}
# Corruptions whose output does not depend on the seed.
DETERMINISTIC = frozenset(
    {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression", "gaussian_blur", "saturate"}
)


def resolve_corruptions(names: list[str] | str | None) -> list[str]:
    """Names, comma lists, `all` (the 15) or `extra` (the 4) -> canonical-order list of names."""
    if names is None:
        return list(CORRUPTIONS)
    if isinstance(names, str):
        names = [names]
    tokens = [token.strip().lower().replace("-", "_") for name in names for token in name.split(",") if token.strip()]
    if not tokens:
        return list(CORRUPTIONS)
    chosen: set[str] = set()
    for token in tokens:
        if token == "all":
            chosen.update(CORRUPTIONS)
        elif token == "extra":
            chosen.update(EXTRA_CORRUPTIONS)
        elif token in REGISTRY:
            chosen.add(token)
        else:
            raise TTAError(f"unknown corruption {token!r}; valid: all, extra, {', '.join(ALL_CORRUPTIONS)}")
    return [name for name in ALL_CORRUPTIONS if name in chosen]


def corruption_seed(seed: int, name: str) -> int:
    """A stable per-(seed, corruption) generator seed. Severity is left out on purpose: one seed gives
    the same random draws (noise field, angles, crops) at every severity, so severities line up."""
    return zlib.crc32(f"{seed}:{name}".encode())


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1..5) to uint8 images (N, H, W, 3) on their device.

    Deterministic for a given (seed, device): the random draws come from a torch.Generator on the
    images' device, so CPU and CUDA give different (equally distributed) noise. The same seed draws
    the same randomness at every severity (streams blend severities on it); pass different seeds for
    independent noise per severity, as `tta corrupt` does.
    """
    if name not in REGISTRY:
        resolved = resolve_corruptions(name)  # normalises spelling, raises for unknown names
        if len(resolved) != 1:
            raise TTAError(f"corrupt() applies one corruption at a time; got {name!r}")
        name = resolved[0]
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise TTAError(f"severity must be one of 1, 2, 3, 4, 5; got {severity!r}")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else ""
        raise TTAError(f"corrupt() needs uint8 images of shape (N, H, W, 3); got {shape} {dtype}".strip())
    if images.shape[0] == 0:
        return images.clone()
    generator = torch.Generator(device=images.device)
    generator.manual_seed(corruption_seed(seed, name))
    with torch.no_grad():
        return REGISTRY[name](images, severity, generator)
