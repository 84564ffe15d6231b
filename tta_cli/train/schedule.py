"""Learning-rate schedules as plain functions of progress, evaluated on the host each step (no sync)."""

from __future__ import annotations

import math

from tta_cli.config import OptimConfig
from tta_cli.errors import TTAError

SCHEDULES = ("multistep", "cosine", "onecycle")


def lr_at(optim: OptimConfig, epoch_float: float) -> float:
    """Learning rate at fractional epoch `epoch_float`; a linear warm-up precedes every schedule.

    multistep: x gamma at each milestone; cosine: half-cosine to 0; onecycle: linear decay to 0 after warm-up.
    """
    if optim.schedule not in SCHEDULES:
        raise TTAError(f"unknown schedule {optim.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if optim.warmup_epochs > 0 and epoch_float < optim.warmup_epochs:
        return optim.lr * (epoch_float + 1e-3) / optim.warmup_epochs
    if optim.schedule == "multistep":
        return optim.lr * optim.gamma ** sum(epoch_float >= m for m in optim.milestones)
    span = max(optim.epochs - optim.warmup_epochs, 1e-9)
    progress = min(max((epoch_float - optim.warmup_epochs) / span, 0.0), 1.0)
    if optim.schedule == "cosine":
        return optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.lr * (1.0 - progress)
