"""Online test-time training (Sun et al. 2020): the episodic update, but the weights carry over from sample to
sample through the stream, with optional reset, rollback and confidence gate (adapt/policies.py). How its calls run
fast (compiled, CUDA graphs, bf16, pipelined or overlapped) is engine/online.py's."""

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
from tta_cli.models.params import adapted_parameter_names
from tta_cli.tasks.views import draw_views, views_from_draws


@dataclass
class TTTOnlineSettings:
    steps: int = 1  # SGD steps per batch of consecutive samples; the shared --steps overrides it


class OnlineTTT(OnlineExecution, PolicyState):
    """Online TTT on one stream: `adapt(images) -> logits` updates, then predicts. The ssl views are `copies`
    augmented copies of each input, as in the paper, or with `train_source` one view of each image it supplies, drawn
    afresh every step (a window of recent video frames). Every decision is a device tensor: no host sync."""

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

    # ---- the passes (engine/online.py wraps them as self._make_views, self._ssl_outputs_and_loss, ...) ---------
    def _view_draws(self, images: torch.Tensor) -> tuple[torch.Tensor, int, tuple]:
        """The views' images, copies of each, and every random number of them (drawn eagerly, in program order)."""
        source, copies = (self.train_source(), 1) if self.train_source is not None else (images, self.config.copies)
        return source, copies, draw_views(self.task, source.shape, copies, source.device, self.generator)

    def _views(self, source: torch.Tensor, copies: int, draws: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        return views_from_draws(self.task, source, copies, draws)

    def _outputs_and_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(inputs.contiguous(), head="ssl")
        return outputs, self.task.loss(outputs, targets)

    def _forward_main(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.contiguous(), head="main")

    # ---- one update: views -> loss -> gradient -> step -> policies --------------------------------------------
    def _update(self, images: torch.Tensor, earlier: torch.Tensor | None = None, join: Callable | None = None):
        """`steps` updates on views of `images`. For the engine's pipelined and overlapped calls: with `earlier`, the
        first forward pass also yields (and this returns) its logits; `join` runs after the first backward pass."""
        earlier_logits = None
        for index in range(self.config.steps):
            first = index == 0
            inputs, targets = self._make_views(images)
            if first and earlier is not None:
                earlier_logits, outputs, loss = self._both_forward(earlier, inputs, targets)
            else:
                outputs, loss = self._ssl_outputs_and_loss(inputs, targets)
            if first:
                self.ssl_loss.copy_(loss.detach().float())
            gate = self._gate(outputs, targets, loss, first)  # None: update
            grads = torch.autograd.grad(loss, self.weights.params)
            if first and join is not None:
                join()
            held_out = self._held_out_views(images) if self.config.rollback.enabled else None
            self._apply(list(grads), gate)
            if held_out is not None:
                self._check_update(*held_out, gate)
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
