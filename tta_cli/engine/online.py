"""How an online method's calls run fast: compiled passes in bf16, CUDA graphs, pipelined and overlapped predictions.

`OnlineExecution` is the base of an online method's maths (methods/ttt_online.py). The method defines its update
(`_update`, `_apply_gradient`), its raw passes (`_view_draws`, `_views`, `_outputs_and_loss`, `_forward_main`) and
its state tensors; this class compiles the passes (not `_view_draws`: random numbers stay eager) and runs them under
bf16 autocast where asked, swaps in the Triton kernels, fuses a prediction into an update's first forward pass
(`_forward_both`), and runs five kinds of call, each replayed from a CUDA graph when the input is a whole batch:
step (update, then logits), predict, update (no logits), pipelined (a prediction folded into the next update's first
forward pass) and overlapped (a prediction on a side CUDA stream beside the next update).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tta_cli.config import CONV_KERNELS, check_choice
from tta_cli.engine.compiled import maybe_compile
from tta_cli.engine.execution import uses_triton_kernels
from tta_cli.engine.graphs import CapturedCall
from tta_cli.engine.precision import autocast_bf16, full_precision
from tta_cli.kernels import triton_conv, triton_norm, zeroed_outputs

TWO_INPUTS = ("overlapped", "pipelined")  # calls on (earlier, images): a prediction of earlier, an update on images


def with_one_fill(call: Callable) -> Callable:
    """`call` inside zeroed_outputs.one_fill with a plan of its own (`.plan`): the zeroed outputs of the atomic
    launches of one call are zeroed together when it starts, not one fill each."""
    plan = zeroed_outputs.new_plan()

    def run(*inputs):
        with zeroed_outputs.one_fill(plan):
            return call(*inputs)

    run.plan = plan
    return run


class OnlineExecution:
    """The calls of an online method (see the module doc). `config` says how they run (compile, cuda_graph,
    conv_kernels, pipeline, batch) and which policies act between them; the state a call changes in place is
    `weights.flat`, `snapshot`, `velocity`, `counts` and the policies' `detector` and `window`."""

    config: object
    device: torch.device
    model: nn.Module

    def _accelerate(self) -> None:
        """Compile the passes, use the Triton kernels where asked, and wrap each kind of call (after the state exists)."""
        config = self.config
        check_choice("conv_kernels", config.conv_kernels, CONV_KERNELS)
        if uses_triton_kernels(config.conv_kernels, self.device):
            triton_conv.use_triton_convs(self.model)
            triton_norm.use_triton_norms(self.model)
        self._main_forward = maybe_compile(self._forward_main, config.compile)
        self._both_forward = self._in_precision(maybe_compile(self._forward_both, config.compile), logits_first=True)
        views = maybe_compile(self._views, config.compile)  # random numbers stay eager: compiled code may reorder them
        self._make_views = lambda images: views(*self._view_draws(images))
        self._ssl_outputs_and_loss = self._in_precision(maybe_compile(self._outputs_and_loss, config.compile))
        self._apply = maybe_compile(self._step_and_forget, config.compile)  # _apply_gradient + policies' forgetting
        self._graphs: dict[str, CapturedCall] = {}
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # overlapped predictions
        calls = {"step": self.step, "predict": self._predict, "update": self._update, "pipelined": self._pipelined, "overlapped": self._overlapped}
        self._calls = {kind: with_one_fill(call) for kind, call in calls.items()}

    def _in_precision(self, call: Callable, logits_first: bool = False) -> Callable:
        """`call` under bf16 autocast (on CUDA, with config.amp); with `logits_first` its first output (logits) back
        in full precision."""

        def run(*inputs):
            with autocast_bf16(self.device, self.config.amp):
                outputs = call(*inputs)
                return (full_precision(outputs[0]), *outputs[1:]) if logits_first else outputs

        return run

    def _forward_both(self, earlier, inputs, targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One encoder pass over [earlier; inputs]: main-head logits of `earlier`, ssl outputs and loss of `inputs`.
        Exact because every normalization here is per sample (GroupNorm, LayerNorm, BatchNorm in eval mode)."""
        features = self.model.features(torch.cat([earlier, inputs]).contiguous())
        outputs = self.model.ssl_head(features[earlier.shape[0]:])
        return self.model.main_head(features[: earlier.shape[0]]).detach(), outputs, self.task.loss(outputs, targets)

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_bf16(self.device, self.config.amp):
            return full_precision(self._main_forward(images))

    def _ssl_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._ssl_outputs_and_loss(inputs, targets)[1]

    def step(self, images: torch.Tensor) -> torch.Tensor:
        """Update on `images`, then their logits (before the update with pre_update); then the collapse check."""
        logits = self._predict(images) if self.config.pre_update else None
        self._update(images)
        logits = self._predict(images) if logits is None else logits
        if self.window is not None:
            self._collapse_reset(logits)
        return logits

    def convolutions(self) -> str:
        """Who runs the convolutions: "torch" or "triton where faster"."""
        return triton_conv.kernels_in(self.model)

    def adapt(self, images: torch.Tensor, update: bool = True) -> torch.Tensor:
        """images (B, C, H, W) with B == config.batch (the last batch may be smaller) -> logits.

        update=False only predicts with the current weights (a stream that fell behind skips the update);
        the samples still count towards `--reset every:N`.
        """
        self._count(images)
        return self._run("step" if update else "predict", images)

    def update(self, images: torch.Tensor) -> None:
        """Adapt on `images` without counting them as new samples: the second half of predicting first with
        `adapt(images, update=False)`. Without rollback nothing needs the step's own logits, so only the update runs."""
        self._run("step" if self.window is not None else "update", images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of `images` on the current weights; nothing changes and nothing is counted."""
        return self._run("predict", images)

    def prepare(self, images: torch.Tensor, kinds: tuple[str, ...] = ("step", "predict")) -> None:
        """Capture the CUDA graphs of `kinds` for inputs shaped like `images` now, so the first real input does not
        pay for it (the kinds in TWO_INPUTS take two such inputs: the earlier frame and this one)."""
        if self._use_graph(images):
            for kind in kinds:
                if kind not in self._graphs:
                    inputs = [images, images] if kind in TWO_INPUTS else [images]
                    self._graphs[kind] = CapturedCall(self._calls[kind], inputs, self._state_tensors())

    def can_overlap(self) -> bool:
        """Whether adapt_overlapped may run: predictions can wait for the next update, and nothing writes the
        weights before that update's own write, while the prediction may still be reading them (a shift reset)."""
        return self.config.steps > 0 and self.detector is None and self._predictions_can_wait()

    def adapt_overlapped(self, images: torch.Tensor, earlier: torch.Tensor | None) -> torch.Tensor | None:
        """Update on `images` (counted as new samples) and return the logits of `earlier` on the weights before that
        update (None: no prediction). On CUDA the prediction runs on a side stream beside the update's forward and
        backward passes and joins before the weights change; elsewhere it simply runs first. Frame t's prediction so
        comes out of frame t+1's call: the same weights, the same logits, off the critical path."""
        if not self.can_overlap():
            raise ValueError("adapt_overlapped needs steps > 0 and no rollback, pre-update, every:N or shift reset (can_overlap)")
        self._count(images)
        if earlier is None:
            self._run("update", images)
            return None
        return self._run("overlapped", earlier, images)

    def can_pipeline(self) -> bool:
        """Whether adapt_sequence may fold predictions into the next update: asked for, on the method's own views
        (no train_source), and predictions can wait for the next update."""
        return self.config.pipeline and self.train_source is None and self._predictions_can_wait()

    def adapt_sequence(self, images: torch.Tensor) -> torch.Tensor:
        """All of `images` (N, C, H, W) in order, config.batch at a time: the logits repeated adapt() calls give.
        With the pipeline, batch t's prediction (weights after its update) comes out of batch t+1's first forward
        pass, which runs on those same weights; the last batch gets a prediction pass of its own."""
        parts = list(images.split(self.config.batch))
        if not self.can_pipeline():
            return torch.cat([self.adapt(part) for part in parts])
        outputs, previous = [], None
        for part in parts:
            self.samples_seen += part.shape[0]
            if previous is None:
                self._run("update", part)
            else:
                outputs.append(self._run("pipelined", previous, part))
            previous = part
        outputs.append(self._run("predict", previous))
        return torch.cat(outputs)

    def _overlapped(self, earlier: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Logits of `earlier` on the current weights, on the side stream, joined before the update on `images`
        writes the weights."""
        if self._side is None:
            logits = self._predict(earlier)
            self._update(images)
            return logits
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            logits = self._predict(earlier)
        self._update(images, join=lambda: main.wait_stream(self._side))
        if not torch.cuda.is_current_stream_capturing():  # eager: the allocator must not hand it back to the side stream early
            logits.record_stream(main)
        return logits

    def _pipelined(self, earlier: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Logits of `earlier` with the current weights, from the first forward pass of the update on `images`."""
        return self._update(images, earlier)

    def _run(self, kind: str, *inputs: torch.Tensor) -> torch.Tensor | None:
        """One call of `kind`, replayed from its CUDA graph (captured at its first use) when every input is a whole batch."""
        if not all(self._use_graph(x) for x in inputs):
            return self._calls[kind](*inputs)
        if kind not in self._graphs:
            self._graphs[kind] = CapturedCall(self._calls[kind], inputs, self._state_tensors())
        logits = self._graphs[kind](*inputs)
        return None if logits is None else logits.clone()

    def _predictions_can_wait(self) -> bool:
        """Whether a prediction (after its own update) may come out of the next call: nothing acts on it before the
        next update (rollback's collapse check), it is not wanted first (pre-update), and no every:N reset intervenes."""
        config = self.config
        return not config.rollback.enabled and not config.pre_update and config.reset.kind != "every"

    def _state_tensors(self) -> list[torch.Tensor]:
        """Everything a call changes in place (put back after a CUDA graph's warm-up calls)."""
        tensors = [self.weights.flat, self.snapshot, self.velocity, *self.counts.values()]
        if self.detector is not None:
            tensors += [self.detector.losses, self.detector.count]
        if self.window is not None:
            tensors += [self.window.predictions, self.window.count]
        return tensors

    def _use_graph(self, images: torch.Tensor) -> bool:
        return self.config.cuda_graph and self.device.type == "cuda" and images.shape[0] == self.config.batch
