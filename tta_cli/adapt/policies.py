"""Reset, rollback and skip policies for online adaptation, shared by `tta adapt` and `tta stream`.

Decisions are 0-dim tensors on the model's device and are applied with `torch.where`, so an
online step needs no host synchronisation and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tta_cli.config import parse_reset


@dataclass
class ResetPolicy:
    """`never`, `every:N` (back to the source weights after every N samples), or `on-shift`.

    on-shift compares the mean self-supervised loss (before the update) of the last `short` samples
    with the mean and spread of the `long` samples before them, and fires when the short mean is
    both `ratio` times the long mean and `sigmas` standard errors above it: a sudden, sustained jump.
    """

    kind: str = "never"
    every: int = 0
    short: int = 8
    long: int = 64
    ratio: float = 1.3
    sigmas: float = 4.0

    @classmethod
    def parse(cls, text: str) -> ResetPolicy:
        kind, every = parse_reset(text)
        return cls(kind=kind, every=every)


class ShiftDetector:
    """Ring buffer of recent ssl losses on the device and the on-shift test (see ResetPolicy)."""

    def __init__(self, policy: ResetPolicy, device: torch.device):
        self.policy = policy
        self.size = policy.short + policy.long
        self.losses = torch.zeros(self.size, device=device)
        self.count = torch.zeros((), device=device, dtype=torch.long)

    def clear(self, fired: torch.Tensor | None = None) -> None:
        if fired is None:
            self.count.zero_()
        else:
            self.count.copy_(torch.where(fired, torch.zeros_like(self.count), self.count))

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """Record one loss; return a 0-dim bool: has a shift just been detected?"""
        policy = self.policy
        self.losses.copy_(torch.roll(self.losses, -1))
        self.losses[-1] = loss.detach().float()
        self.count.add_(1)
        recent = self.losses[-policy.short :]
        history = self.losses[: policy.long]
        long_mean = history.mean()
        long_std = history.std()
        short_mean = recent.mean()
        standard_error = long_std / math.sqrt(policy.short) + 1e-6
        jump = (short_mean > policy.ratio * long_mean) & (short_mean > long_mean + policy.sigmas * standard_error)
        return jump & (self.count >= self.size)


@dataclass
class RollbackPolicy:
    """Undo harmful updates. The ssl loss on fresh views of the current input is measured before and
    after each update; if it rose by more than `margin` (relative), the weights go back to the last-good snapshot, and after
    `max_strikes` rollbacks in a row (the snapshot itself is bad) to the source weights. Predictions
    collapsing (entropy of the predicted-class histogram over the last `window` samples below
    `min_entropy` nats) also restores the source weights. A snapshot is taken every `snapshot_every`
    good updates."""

    enabled: bool = False
    margin: float = 0.2
    max_strikes: int = 3
    window: int = 128
    min_entropy: float = 0.5
    snapshot_every: int = 16


class PredictionWindow:
    """Histogram of the last `window` predicted classes, kept on the device."""

    def __init__(self, window: int, classes: int, device: torch.device):
        self.window = window
        self.classes = classes
        self.predictions = torch.zeros(window, device=device, dtype=torch.long)
        self.count = torch.zeros((), device=device, dtype=torch.long)

    def update(self, predicted: torch.Tensor) -> None:
        """predicted: (B,) class indices, B <= window."""
        batch = predicted.shape[0]
        self.predictions.copy_(torch.roll(self.predictions, -batch))
        self.predictions[-batch:] = predicted
        self.count.add_(batch)

    def entropy(self) -> torch.Tensor:
        ones = torch.ones(self.window, device=self.predictions.device)
        counts = torch.zeros(self.classes, device=self.predictions.device).scatter_add_(0, self.predictions, ones)
        histogram = counts / self.window  # scatter_add, unlike bincount, needs no host sync
        return -(histogram * histogram.clamp_min(1e-12).log()).sum()

    def collapsed(self, min_entropy: float) -> torch.Tensor:
        return (self.entropy() < min_entropy) & (self.count >= self.window)

    def clear(self, fired: torch.Tensor) -> None:
        self.count.copy_(torch.where(fired, torch.zeros_like(self.count), self.count))


# ---- the policies applied to an online method's state: its flat weights (`weights.flat`), `source`, `snapshot`,
# `velocity`, `counts`, `detector`, `window` and `config` (methods/ttt_online.py's OnlineTTT) -------------------------


def restore(state, condition: torch.Tensor, target: torch.Tensor, also_snapshot: bool = False) -> None:
    """Where `condition` (0-dim bool) holds: the weights (and with `also_snapshot` the snapshot) become `target`,
    and the momentum is cleared."""
    flat = state.weights.flat
    flat.copy_(torch.where(condition, target, flat))
    state.velocity.copy_(torch.where(condition, torch.zeros_like(state.velocity), state.velocity))
    if also_snapshot:
        state.snapshot.copy_(torch.where(condition, target, state.snapshot))


def shift_reset(state, loss: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor | None:
    """`--reset on-shift`: record the step's loss; on a detected shift go back to the source weights and drop this
    step's update (its gradient belongs to the weights just replaced). Returns the update's gate."""
    if state.detector is None:
        return gate
    fired = state.detector.update(loss)
    restore(state, fired, state.source, also_snapshot=True)
    state.detector.clear(fired)
    state.counts["shift_resets"] += fired.long()
    kept = (~fired).float()
    return kept if gate is None else gate * kept


def collapse_reset(state, logits: torch.Tensor) -> None:
    """Rollback's collapse check: back to the source weights when the recent predictions have collapsed."""
    state.window.update(logits.argmax(1))
    collapsed = state.window.collapsed(state.config.rollback.min_entropy)
    restore(state, collapsed, state.source, also_snapshot=True)
    state.window.clear(collapsed)
    state.counts["collapse_resets"] += collapsed.long()


def rollback(state, loss_before: torch.Tensor, loss_after: torch.Tensor, gate: torch.Tensor | None) -> None:
    """Undo an update that raised the ssl loss (on fresh views of the input) by more than the margin: back to the
    snapshot, or after `max_strikes` in a row to the source; snapshot every `snapshot_every` good updates. `gate` as
    the update's (None: it ran; a skipped update is neither good nor bad)."""
    policy, counts = state.config.rollback, state.counts
    worse = ~(loss_after <= loss_before * (1.0 + policy.margin))  # a NaN loss after is worse too
    good = ~worse
    if gate is not None:
        worse, good = worse & (gate > 0), good & (gate > 0)
    counts["strikes"].copy_(torch.where(worse, counts["strikes"] + 1, torch.zeros_like(counts["strikes"])))
    to_source = counts["strikes"] >= policy.max_strikes
    restore(state, worse, torch.where(to_source, state.source, state.snapshot))
    state.snapshot.copy_(torch.where(to_source, state.source, state.snapshot))
    counts["strikes"].copy_(torch.where(to_source, torch.zeros_like(counts["strikes"]), counts["strikes"]))
    counts["rollbacks"] += worse.long()
    counts["rollbacks_to_source"] += to_source.long()
    counts["good_steps"] += good.long()
    take = good & (counts["good_steps"] % policy.snapshot_every == 0)
    state.snapshot.copy_(torch.where(take, state.weights.flat, state.snapshot))
