"""Mixed precision in one place: bf16 autocast on CUDA only, and logits back in full precision."""

from __future__ import annotations

import torch


def autocast_bf16(device: torch.device, enabled: bool):
    """bf16 autocast when `enabled` and on CUDA; on the CPU always full precision."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 autocast outputs -> float32; float32/float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
