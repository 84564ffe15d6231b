"""The phases of a training run: which parts of the model train, on which losses, at which learning rate.

- Joint training (the default): encoder, main head and ssl head together on CE + ssl_weight * L(ssl).
- `--init FILE` (init.py): the new ssl head alone for init.ssl_epochs (the classifier frozen), then all of it at
  init.joint_lr, low, so the classifier's accuracy is kept.
- Probing (probe.ssl_epochs > 0), TTT-MAE's training: the encoder and ssl head on the ssl loss alone for
  probe.ssl_epochs (self-supervised pre-training; the main head frozen and its loss off), then the main head alone
  on the frozen encoder at probe.main_lr. The classifier then reads features that only the ssl task shaped, so a
  test-time step on that task moves what the classifier reads; joint training lets the main loss shape them.

optim.schedule (with its warm-up) runs within each phase. A frozen part gets no gradients and stays in evaluation
mode (BatchNorm statistics kept).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tta_cli.config import OptimConfig, TrainConfig, check_range
from tta_cli.errors import TTAError
from tta_cli.train.schedule import lr_at

PARTS = ("encoder", "main_head", "ssl_head")


@dataclass(frozen=True)
class Phase:
    name: str  # joint | ssl-head (--init) | ssl | probe (probing)
    start: int  # its first epoch (0-based)
    epochs: int
    lr: float  # peak learning rate of optim.schedule within the phase
    trains: tuple[str, ...]  # the parts of the model (PARTS) that learn
    main_weight: float  # the main loss's weight: 0 keeps its gradient out of the encoder
    ssl_weight: float


def phases(config: TrainConfig) -> list[Phase]:
    """The run's phases in order (those of at least one epoch)."""
    optim, epochs = config.optim, config.optim.epochs
    if config.init.weights is not None:
        first = config.init.ssl_epochs
        planned = [Phase("ssl-head", 0, first, optim.lr, ("ssl_head",), 1.0, optim.ssl_weight),
                   Phase("joint", first, epochs - first, config.init.joint_lr, PARTS, 1.0, optim.ssl_weight)]
    elif config.probe.ssl_epochs:
        first = config.probe.ssl_epochs
        planned = [Phase("ssl", 0, first, optim.lr, ("encoder", "ssl_head"), 0.0, optim.ssl_weight),
                   Phase("probe", first, epochs - first, optim.lr if config.probe.main_lr is None else config.probe.main_lr,
                         ("main_head",), 1.0, 0.0)]
    else:
        planned = [Phase("joint", 0, epochs, optim.lr, PARTS, 1.0, optim.ssl_weight)]
    return [phase for phase in planned if phase.epochs > 0] or planned[-1:]


def phase_at(config: TrainConfig, epoch: int) -> Phase:
    """The phase that trains `epoch` (0-based)."""
    return [phase for phase in phases(config) if phase.start <= epoch][-1]


def phase_lr(optim: OptimConfig, phase: Phase, epoch_float: float) -> float:
    """The learning rate at `epoch_float` (fractional epochs of the run) in `phase`: optim.schedule over the phase's
    epochs, at its rate."""
    return lr_at(dataclasses.replace(optim, epochs=max(phase.epochs, 1), lr=phase.lr), epoch_float - phase.start)


def set_phase(model, phase: Phase) -> None:
    """Parts that train get gradients and training mode; the others neither. Call with the model in training mode."""
    for name in PARTS:
        part = getattr(model, name)
        part.requires_grad_(name in phase.trains)
        part.train(name in phase.trains)


def check_probe(config: TrainConfig) -> None:
    """Probing needs a self-supervised loss, epochs left for the main head, and no --init."""
    settings = config.probe
    check_range("probe.ssl_epochs", settings.ssl_epochs, 0)
    if settings.main_lr is not None and not settings.main_lr > 0:
        raise TTAError(f"probe.main_lr must be above 0 (or null for optim.lr), got {settings.main_lr}")
    if not settings.ssl_epochs:
        return
    if config.init.weights is not None:
        raise TTAError("probe.ssl_epochs pre-trains a new encoder, --init starts from a trained one; use one of them")
    if settings.ssl_epochs >= config.optim.epochs:
        raise TTAError(f"probe.ssl_epochs {settings.ssl_epochs} leaves none of optim.epochs {config.optim.epochs} to train "
                       "the main head; lower it or raise --epochs")
    if not config.optim.ssl_weight > 0:
        raise TTAError("probe.ssl_epochs pre-trains on the ssl loss, and optim.ssl_weight is 0; set it above 0")
