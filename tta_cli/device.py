"""Pick the torch device from `--device auto|cpu|cuda[:N]`."""

from __future__ import annotations

import torch

from tta_cli.errors import TTAError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present; asking for CUDA on a machine without it is a user error."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TTAError(f"--device {name} asked for CUDA, but no CUDA GPU is available here; use --device cpu or auto")
        return torch.device(name)
    raise TTAError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global generators and return a CPU generator for explicit use."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
