"""Online test-time training (Sun et al. 2020): the episodic update, but the weights carry over from sample to
sample through the stream (implicit memory), with optional reset, rollback and confidence gate (adapt/policies.py).

OnlineTTT is the maths of one stream; engine/online.py runs its calls fast (compiled, CUDA graphs, pipelined or
overlapped predictions) and methods/base.py's OnlineMethod puts it behind the registry, with a parallel twin for
independent segments (engine/parallel_online.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.base import OnlineMethod
from tta_cli.adapt.online import OnlineConfig
from tta_cli.adapt.policies import PolicyState, check_confidence
from tta_cli.engine.flat import FlatParameters
from tta_cli.engine.online import OnlineExecution
from tta_cli.engine.precision import autocast_bf16, full_precision
from tta_cli.models.params import adapted_parameter_names
from tta_cli.tasks.views import make_views


@dataclass
class TTTOnlineSettings:
    steps: int = 1  # SGD steps per batch of consecutive samples; the shared --steps overrides it


class OnlineTTT(OnlineExecution, PolicyState):
    """Online TTT on one stream: `adapt(images) -> logits` updates, then predicts (engine/online.py runs the calls;
    policies.PolicyState holds the reset, rollback and gate state and acts on it).

    `train_source`, when given, supplies the images the ssl views come from (one view each), drawn afresh for every
    step (e.g. a batch from a window of recent video frames); without it the views are `copies` augmented copies
    of each input, as in the paper. Every decision is a device tensor applied with torch.where: no host sync.
    """

    def __init__(self, model: nn.Module, task, config: OnlineConfig, classes: int,
                 generator: torch.Generator | None = None, train_source: Callable[[], torch.Tensor] | None = None):
        check_confidence(task, config.skip_above)
        self.model, self.task, self.config = model.eval().requires_grad_(False), task, config
        self.generator, self.train_source = generator, train_source
        self.device = next(model.parameters()).device
        self.weights = FlatParameters(model, adapted_parameter_names(model, config.params))
        for param in self.weights.params:
            param.requires_grad_(True)
        self._init_policies(config, classes, self.device)
        self.ssl_loss = torch.full((), float("nan"), device=self.device)  # the first step's loss on the latest input
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
                gate = self._shift_reset(loss, gate)
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
            self._collapse_reset(logits)
        return logits

    def _ssl_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_bf16(self.device, self.config.amp):
            return self._ssl_outputs_and_loss(inputs, targets)[1]

    def _check_update(self, inputs, targets, loss_before: torch.Tensor, gate: torch.Tensor | None) -> None:
        """Roll back an update that raised the ssl loss on fresh views of the input (PolicyState._rollback)."""
        self._rollback(loss_before, self._ssl_loss(inputs, targets), gate)


@register
class TTTOnline(OnlineMethod):
    name = "ttt-online"
    semantics = (
        "Online TTT, the weights carried from sample to sample. The ttt update, weights carried across the stream in "
        "`order`; reset per `reset` and at each segment; rollback if enabled. Independent segments run side by side "
        "(`streams` at once), each on its own weights, with the updates it would get alone."
    )
    updates = "the `params` group (default: the encoder), carried over"
    Settings = TTTOnlineSettings
    stream_class = OnlineTTT
