"""Online test-time training (Sun et al. 2020): the episodic update, but the weights carry over from sample to
sample through the stream (implicit memory), with optional reset, rollback and confidence gate (adapt/policies.py).

OnlineTTT is the maths of one stream; engine/online.py runs its calls fast (compiled, CUDA graphs, pipelined or
overlapped predictions) and engine/parallel_online.py adapts independent segments side by side.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.methods.ttt import check_confidence
from tta_cli.adapt.online_config import OnlineConfig, online_config, online_generator
from tta_cli.adapt.params import adapted_parameter_names
from tta_cli.adapt.policies import PredictionWindow, ShiftDetector, collapse_reset, rollback, shift_reset
from tta_cli.adapt.views import autocast_bf16, full_precision, make_views
from tta_cli.engine.execution import resolve
from tta_cli.engine.flat import FlatParameters
from tta_cli.engine.online import OnlineExecution
from tta_cli.engine.parallel_online import ParallelOnlineTTT, supports_parallel
from tta_cli.errors import TTAError

COUNTS = ("updates", "skipped", "rollbacks", "rollbacks_to_source", "collapse_resets", "shift_resets", "good_steps", "strikes")


@dataclass
class TTTOnlineSettings:
    steps: int = 1  # SGD steps per batch of consecutive samples; the shared --steps overrides it


class OnlineTTT(OnlineExecution):
    """Online TTT on one stream: `adapt(images) -> logits` updates, then predicts (engine/online.py runs the calls).

    `train_source`, when given, supplies the images the ssl views come from (one view each), drawn afresh for every
    step (e.g. a batch from a window of recent video frames); without it the views are `copies` augmented copies
    of each input, as in the paper. The adapted parameters are views of one flat buffer, and every decision is a
    device tensor applied with torch.where, so a whole step runs without a host sync.
    """

    def __init__(self, model: nn.Module, task, config: OnlineConfig, classes: int,
                 generator: torch.Generator | None = None, train_source: Callable[[], torch.Tensor] | None = None):
        if config.reset.kind == "every" and config.reset.every % config.batch:
            raise TTAError(f"--reset every:{config.reset.every} must be a multiple of the online batch ({config.batch})")
        if config.skip_above is not None and not hasattr(task, "confidence"):
            raise TTAError(f"--skip-above needs a task with a confidence (rotation), not {task.name}")
        self.model, self.task, self.config = model.eval().requires_grad_(False), task, config
        self.generator, self.train_source = generator, train_source
        self.device = next(model.parameters()).device
        self.weights = FlatParameters(model, adapted_parameter_names(model, config.params))
        for param in self.weights.params:
            param.requires_grad_(True)
        self.source, self.snapshot = self.weights.flat.clone(), self.weights.flat.clone()
        self.velocity = torch.zeros_like(self.weights.flat)
        self.counts = {name: torch.zeros((), device=self.device, dtype=torch.long) for name in COUNTS}
        self.detector = ShiftDetector(config.reset, self.device) if config.reset.kind == "on-shift" else None
        self.window = PredictionWindow(config.rollback.window, classes, self.device) if config.rollback.enabled else None
        self.ssl_loss = torch.full((), float("nan"), device=self.device)  # the first step's loss on the latest input
        self.samples_seen = self.scheduled_resets = 0
        self._accelerate()

    # ---- the passes (engine/online.py compiles them as self._make_views, self._ssl_outputs_and_loss, ...) ----
    def _views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        source, copies = (self.train_source(), 1) if self.train_source is not None else (images, self.config.copies)
        return make_views(self.task, source, copies, self.generator)

    def _outputs_and_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(inputs.contiguous(), head="ssl")
        return outputs, self.task.loss(outputs, targets)

    def _forward_main(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.contiguous(), head="main")

    def _forward_both(self, earlier, inputs, targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One encoder pass over [earlier; inputs]: main-head logits of `earlier`, ssl outputs and loss of `inputs`.
        Exact because every normalization here is per sample (GroupNorm, LayerNorm, BatchNorm in eval mode)."""
        features = self.model.features(torch.cat([earlier, inputs]).contiguous())
        outputs = self.model.ssl_head(features[earlier.shape[0]:])
        return self.model.main_head(features[: earlier.shape[0]]).detach(), outputs, self.task.loss(outputs, targets)

    # ---- one step: views -> loss -> gradient -> step -> policies -------------------------------------------
    def _update(self, images: torch.Tensor, earlier: torch.Tensor | None = None, join: Callable | None = None):
        """`steps` updates on views of `images`. With `earlier`, the first forward pass also yields (and this returns)
        the main-head logits of `earlier` on the weights before; `join` runs after the first backward pass."""
        config, earlier_logits = self.config, None
        for index in range(config.steps):
            inputs, targets = self._make_views(images)
            with autocast_bf16(self.device, config.amp):
                if earlier is not None and index == 0:
                    earlier_logits, outputs, loss = self._both_forward(earlier, inputs, targets)
                    earlier_logits = full_precision(earlier_logits)
                else:
                    outputs, loss = self._ssl_outputs_and_loss(inputs, targets)
            gate = None  # None: always update
            if config.skip_above is not None:
                gate = (self.task.confidence(outputs, targets) <= config.skip_above).float()
            if index == 0:
                self.ssl_loss.copy_(loss.detach().float())
                gate = shift_reset(self, loss, gate)
            grads = torch.autograd.grad(loss, self.weights.params)
            if join is not None and index == 0:
                join()
            if config.rollback.enabled:  # held-out views of the same input judge the update
                check_inputs, check_targets = self._make_views(images)
                check_before = self._ssl_loss(check_inputs, check_targets)
            self._apply(list(grads), gate)
            if config.rollback.enabled:
                self._check_update(check_inputs, check_targets, check_before, gate)
        return earlier_logits

    def _apply_gradient(self, grads: list[torch.Tensor], gate: torch.Tensor | None) -> None:
        """Momentum SGD on the flat weights where `gate` > 0 (None: always), and its count."""
        config, counts, flat = self.config, self.counts, self.weights.flat
        grad = torch.cat([g.reshape(-1) for g in grads]).to(flat.dtype)
        if gate is None:
            self.velocity.mul_(config.momentum).add_(grad)
            flat.sub_(self.velocity, alpha=config.lr)
            counts["updates"] += 1
            return
        self.velocity.copy_(torch.where(gate > 0, self.velocity * config.momentum + grad, self.velocity))
        flat.sub_(gate * self.velocity, alpha=config.lr)  # (lr as given: a float32 gate times lr would round it)
        counts["updates"] += gate.long()
        counts["skipped"] += (1 - gate).long()

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_bf16(self.device, self.config.amp):
            return full_precision(self._main_forward(images))

    def step(self, images: torch.Tensor) -> torch.Tensor:
        """Update on `images`, then their logits (before the update with pre_update); then the collapse check."""
        logits = self._predict(images) if self.config.pre_update else None
        self._update(images)
        logits = self._predict(images) if logits is None else logits
        if self.window is not None:
            collapse_reset(self, logits)
        return logits

    def _ssl_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_bf16(self.device, self.config.amp):
            return self._ssl_outputs_and_loss(inputs, targets)[1]

    def _check_update(self, inputs, targets, loss_before: torch.Tensor, gate: torch.Tensor | None) -> None:
        """Roll back an update that raised the ssl loss on fresh views of the input (policies.rollback)."""
        rollback(self, loss_before, self._ssl_loss(inputs, targets), gate)

    # ---- state -----------------------------------------------------------------------------------------------
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


@register
class TTTOnline(Method):
    name = "ttt-online"
    takes_sequences = True
    semantics = (
        "Online TTT, the weights carried from sample to sample. The ttt update, weights carried across the stream in "
        "`order`; reset per `reset` and at each segment; "
        "rollback if enabled. Independent segments run side by side (`streams` at once), each on its own weights, with "
        "the updates it would get alone."
    )
    updates = "the `params` group (default: the encoder), carried over"
    Settings = TTTOnlineSettings

    def __init__(self, model, task, settings, common, classes, device):
        check_confidence(task, common.skip_above)
        super().__init__(model, task, settings, common, classes, device)
        execution = resolve(common, device)
        steps = settings.steps if common.steps is None else common.steps
        config = online_config(common, execution, steps, batch=common.batch, skip_above=common.skip_above)
        self.amp = config.amp
        generator = online_generator(common, execution)
        self.parallel = None  # independent segments side by side, on a copy that keeps torch's kernels (vmap needs them)
        if execution.streams > 1 and supports_parallel(config):
            parallel_config = replace(config, amp=execution.amp("parallel"))
            self.parallel = ParallelOnlineTTT(copy.deepcopy(model), task, parallel_config, generator, execution.streams)
        self.online = OnlineTTT(model, task, config, classes, generator)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        return self.online.adapt(images)

    def adapt_sequence(self, images: torch.Tensor) -> torch.Tensor:
        return self.online.adapt_sequence(images)

    def reset(self) -> None:
        self.online.reset()

    def counters(self) -> dict[str, int]:
        values = self.online.counters()
        for name, value in (self.parallel.counters() if self.parallel is not None else {}).items():
            values[name] += value
        return values

    def batch_size(self, sample: torch.Tensor) -> int:
        return self.common.batch

    def side_by_side(self, segments: int) -> bool:
        return self.parallel is not None and segments > 1

    def adapt_streams(self, images, streams, on_step):
        return self.parallel.adapt_streams(images, streams, on_step)

    def precision(self, side_by_side: bool = False) -> str:
        self.amp = (self.parallel if side_by_side else self.online).config.amp
        return super().precision()

    def convolutions(self, side_by_side: bool = False) -> str:
        return (self.parallel if side_by_side else self.online).convolutions()
