"""Reset, rollback, skip and forgetting policies for online adaptation, shared by `tta adapt` and `tta stream`.

Decisions are 0-dim tensors on the model's device and are applied with `torch.where`, so an
online step needs no host synchronisation and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tta_cli.config import parse_reset
from tta_cli.errors import TTAError


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



COUNTS = ("updates", "skipped", "rollbacks", "rollbacks_to_source", "collapse_resets", "shift_resets", "good_steps", "strikes")


def check_confidence(task, skip_above: float | None) -> None:
    """The skip gate (--skip-above) reads the task's confidence, which only rotation has."""
    if skip_above is not None and not hasattr(task, "confidence"):
        raise TTAError(f"--skip-above needs the rotation task; this checkpoint's task is {task.name}")


class PolicyState:
    """What the online policies act on, and the policies themselves: the flat weights (`weights.flat`, set by the
    method), their source and last-good snapshot, the momentum, counters on the device, the shift detector and the
    prediction window. `config` holds the ResetPolicy (`reset`) and the RollbackPolicy (`rollback`)."""

    def _init_policies(self, config, classes: int, device: torch.device) -> None:
        if config.reset.kind == "every" and config.reset.every % config.batch:
            raise TTAError(f"--reset every:{config.reset.every} must be a multiple of the online batch ({config.batch})")
        flat = self.weights.flat
        self.source, self.snapshot, self.velocity = flat.clone(), flat.clone(), torch.zeros_like(flat)
        self.counts = {name: torch.zeros((), device=device, dtype=torch.long) for name in COUNTS}
        self.detector = ShiftDetector(config.reset, device) if config.reset.kind == "on-shift" else None
        self.window = PredictionWindow(config.rollback.window, classes, device) if config.rollback.enabled else None
        self.samples_seen = self.scheduled_resets = 0

    def reset(self) -> None:
        """Back to the source weights (and clear momentum, snapshot and detector history)."""
        self.weights.flat.copy_(self.source)
        self.snapshot.copy_(self.source)
        self.velocity.zero_()
        self.counts["strikes"].zero_()
        if self.detector is not None:
            self.detector.clear()
        if self.window is not None:
            self.window.count.zero_()

    def counters(self) -> dict[str, int]:
        values = {name: int(value) for name, value in self.counts.items() if name not in ("good_steps", "strikes")}
        values["scheduled_resets"] = self.scheduled_resets
        values["resets"] = values["scheduled_resets"] + values["shift_resets"] + values["collapse_resets"]
        return values

    def _count(self, images: torch.Tensor) -> None:
        """`images` are new samples: first the scheduled reset (`--reset every:N`) when N samples have passed."""
        policy = self.config.reset
        if policy.kind == "every" and self.samples_seen and self.samples_seen % policy.every == 0:
            self.reset()
            self.scheduled_resets += 1
        self.samples_seen += images.shape[0]

    def _step_and_forget(self, grads: list[torch.Tensor], gate: torch.Tensor | None) -> None:
        """The method's gradient step (`_apply_gradient`), then the forgetting gate (`--forget LAMBDA`): every step the
        weights decay toward the source, w <- (1 - LAMBDA) w + LAMBDA w_source, whether or not the step was skipped."""
        self._apply_gradient(grads, gate)
        if self.config.forget is not None:
            self.weights.flat.lerp_(self.source, self.config.forget)  # exact at 0 (w) and at 1 (w_source)

    def _restore(self, condition: torch.Tensor, target: torch.Tensor, also_snapshot: bool = False) -> None:
        """Where `condition` (0-dim bool) holds: the weights (and with `also_snapshot` the snapshot) become `target`,
        and the momentum is cleared."""
        flat = self.weights.flat
        flat.copy_(torch.where(condition, target, flat))
        self.velocity.copy_(torch.where(condition, torch.zeros_like(self.velocity), self.velocity))
        if also_snapshot:
            self.snapshot.copy_(torch.where(condition, target, self.snapshot))

    def _shift_reset(self, loss: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor | None:
        """`--reset on-shift`: record the step's loss; on a detected shift go back to the source weights and drop
        this step's update (its gradient belongs to the weights just replaced). Returns the update's gate."""
        if self.detector is None:
            return gate
        fired = self.detector.update(loss)
        self._restore(fired, self.source, also_snapshot=True)
        self.detector.clear(fired)
        self.counts["shift_resets"] += fired.long()
        kept = (~fired).float()
        return kept if gate is None else gate * kept

    def _collapse_reset(self, logits: torch.Tensor) -> None:
        """Rollback's collapse check: back to the source weights when the recent predictions have collapsed."""
        self.window.update(logits.argmax(1))
        collapsed = self.window.collapsed(self.config.rollback.min_entropy)
        self._restore(collapsed, self.source, also_snapshot=True)
        self.window.clear(collapsed)
        self.counts["collapse_resets"] += collapsed.long()

    def _gate(self, outputs: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, first: bool) -> torch.Tensor | None:
        """The update's gate (None: it runs): the confidence gate (--skip-above) and, on an input's first step, the
        shift reset, which records the loss."""
        gate = None
        if self.config.skip_above is not None:
            gate = (self.task.confidence(outputs, targets) <= self.config.skip_above).float()
        return self._shift_reset(loss, gate) if first else gate

    def _held_out_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rollback's judges of an update: fresh views of the input, their targets and ssl loss before it."""
        inputs, targets = self._make_views(images)
        return inputs, targets, self._ssl_loss(inputs, targets)

    def _check_update(self, inputs, targets, loss_before: torch.Tensor, gate: torch.Tensor | None) -> None:
        """Roll back an update that raised the ssl loss on the held-out views (_rollback)."""
        self._rollback(loss_before, self._ssl_loss(inputs, targets), gate)

    def _rollback(self, loss_before: torch.Tensor, loss_after: torch.Tensor, gate: torch.Tensor | None) -> None:
        """Undo an update that raised the ssl loss (on fresh views of the input) by more than the margin: back to the
        snapshot, or after `max_strikes` in a row to the source; snapshot every `snapshot_every` good updates. `gate`
        as the update's (None: it ran; a skipped update is neither good nor bad)."""
        policy, counts = self.config.rollback, self.counts
        worse = ~(loss_after <= loss_before * (1.0 + policy.margin))  # a NaN loss after is worse too
        good = ~worse
        if gate is not None:
            worse, good = worse & (gate > 0), good & (gate > 0)
        counts["strikes"].copy_(torch.where(worse, counts["strikes"] + 1, torch.zeros_like(counts["strikes"])))
        to_source = counts["strikes"] >= policy.max_strikes
        self._restore(worse, torch.where(to_source, self.source, self.snapshot))
        self.snapshot.copy_(torch.where(to_source, self.source, self.snapshot))
        counts["strikes"].copy_(torch.where(to_source, torch.zeros_like(counts["strikes"]), counts["strikes"]))
        counts["rollbacks"] += worse.long()
        counts["rollbacks_to_source"] += to_source.long()
        counts["good_steps"] += good.long()
        take = good & (counts["good_steps"] % policy.snapshot_every == 0)
        self.snapshot.copy_(torch.where(take, self.weights.flat, self.snapshot))
