"""Online TTT: the same self-supervised update as episodic TTT, but the weights carry over through
the stream (implicit memory), with optional reset, rollback and a confidence gate.

The adapted parameters live as views of one flat buffer, so an update, a snapshot, a rollback or a
reset is one kernel each, and every decision is a device tensor: a whole step runs without a host
sync and, on CUDA, is captured once in a CUDA graph and replayed per batch. `adapt_sequence` takes a run
of batches at once (optionally folding each prediction into the next update's forward pass);
`adapt_overlapped` runs a prediction on a second CUDA stream beside an update (the video stream's loop);
independent segments go to the `parallel` twin (online_parallel.py).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tta_cli.adapt.compiled import SAME_RANDOM_NUMBERS, maybe_compile
from tta_cli.adapt.graphs import CapturedCall
from tta_cli.adapt.online_parallel import ParallelOnlineTTT, supports_parallel
from tta_cli.adapt.params import UpdateConfig, adapted_parameter_names
from tta_cli.adapt.policies import PredictionWindow, ResetPolicy, RollbackPolicy, ShiftDetector
from tta_cli.adapt.views import autocast_bf16, full_precision, make_views
from tta_cli.errors import TTAError
from tta_cli.models import triton_conv, triton_norm, zeroed_outputs


@dataclass
class OnlineConfig(UpdateConfig):
    batch: int = 1  # consecutive samples adapted together
    skip_above: float | None = None
    reset: ResetPolicy = field(default_factory=ResetPolicy)
    rollback: RollbackPolicy = field(default_factory=RollbackPolicy)
    pre_update: bool = False  # predict before the update (lowest latency) instead of after
    amp: bool = True
    # bf16 autocast for the parallel streams' step (online_parallel.py); None: as `amp`. The parallel step and the
    # one-stream step answer differently: 15 streams side by side ran 2,545 samples/s in bf16 against 1,693 in
    # fp32 on the H200 (one stream: 494 bf16 vs 533 fp32), so `tta adapt` sets each its own (AdaptSettings.amp).
    parallel_amp: bool | None = None
    cuda_graph: bool = True  # capture the step on CUDA
    # torch.compile the model's forward passes (and so their backward): fuses each norm + ReLU + residual add
    # into one kernel, which is what a launch-bound step of a small network pays for. The compiled kernels are
    # then captured in the step's CUDA graph like any other. "aot_eager" traces without generating code (tests).
    compile: bool = False
    compile_backend: str = "inductor"
    # channels_last weights and inputs: cuDNN's fast kernels are NHWC, and on NCHW fp32 tensors it wraps them in
    # transposes (105 a step, 15% of the compiled online step's device time on an H200). Measured there: slower
    # (476 vs 534 samples/s, compiled fp32 in a graph), so off.
    channels_last: bool = False
    cudnn_benchmark: bool = False  # cuDNN's autotuner for the step's fixed shapes (process-wide); no change measured
    # adapt_sequence: predict each batch inside the next batch's first forward pass (the weights are the same
    # ones), saving the separate prediction pass; exactly the sequential result. 570 vs 534 samples/s on the
    # H200; `tta adapt` turns it on (AdaptSettings.pipeline), the object's own default stays the plain loop.
    pipeline: bool = False
    # Who runs the one-stream step's convolutions and norms: "torch" (cuDNN and inductor's kernels on CUDA), "triton"
    # (models/triton_conv.py: per operation and shape, whichever of cuDNN and its Triton implicit-GEMM kernels timed
    # fastest; and models/triton_norm.py: each GroupNorm + ReLU as one Triton kernel each way) or "auto" (triton on
    # CUDA, torch elsewhere). The parallel streams keep torch's, which vmap needs.
    conv_kernels: str = "torch"


CONV_KERNELS = ("auto", "torch", "triton")


def check_conv_kernels(value: str) -> None:
    """A one-line user error for an unknown `conv_kernels`, raised before any work."""
    if value not in CONV_KERNELS:
        raise TTAError(f"unknown conv_kernels {value!r}; choose one of: {', '.join(CONV_KERNELS)}")


def uses_triton_convs(conv_kernels: str, device: torch.device) -> bool:
    """Whether `conv_kernels` means the Triton convolutions on `device`: "auto" on CUDA only (the CPU would run
    them through Triton's interpreter, which only the tests want), "triton" wherever they can run. An unknown
    value is a user error here, where it is read, not a silent "torch"."""
    check_conv_kernels(conv_kernels)
    wanted = conv_kernels == "triton" or (conv_kernels == "auto" and device.type == "cuda")
    return wanted and triton_conv.available(device)


class FlatParameters:
    """Re-point the chosen parameters at slices of one contiguous buffer (shared storage).

    With `channels_last`, each 4-D (convolution) weight's slice holds it in (O, kH, kW, I) order and the
    parameter is a channels_last-strided view of it, so cuDNN's NHWC kernels read it without a transpose.
    """

    def __init__(self, model: nn.Module, names: list[str], channels_last: bool = False):
        named = dict(model.named_parameters())
        self.params = [named[n] for n in names]
        self.channels_last = [channels_last and p.dim() == 4 for p in self.params]
        self.flat = torch.cat([self.storage_order(p.detach(), nhwc) for p, nhwc in zip(self.params, self.channels_last, strict=True)]).clone()
        offset = 0
        for param, nhwc in zip(self.params, self.channels_last, strict=True):
            size = param.numel()
            piece = self.flat[offset : offset + size]
            if nhwc:
                out_channels, in_channels, kernel_h, kernel_w = param.shape
                param.data = piece.view(out_channels, kernel_h, kernel_w, in_channels).permute(0, 3, 1, 2)
            else:
                param.data = piece.view_as(param)
            offset += size

    @staticmethod
    def storage_order(tensor: torch.Tensor, nhwc: bool) -> torch.Tensor:
        """A parameter-shaped tensor flattened in the order its slice of `flat` stores it."""
        return tensor.permute(0, 2, 3, 1).reshape(-1) if nhwc else tensor.reshape(-1)

    def flatten(self, grads) -> torch.Tensor:
        """The parameters' gradients (in order) as one tensor laid out like `flat`."""
        pieces = [self.storage_order(g, nhwc) for g, nhwc in zip(grads, self.channels_last, strict=True)]
        return torch.cat(pieces).to(self.flat.dtype)


TWO_INPUTS = ("overlapped", "pipelined")  # calls on (earlier, images): a prediction of earlier, an update on images


def _with_one_fill(call: Callable) -> Callable:
    """`call` inside zeroed_outputs.one_fill with a plan of its own (`.plan`): the atomic launches' zeroed outputs of
    one call (a step, a prediction) are zeroed together when it starts, not one fill each (65 fills, 60 us of a
    stream frame's 1,159 us)."""
    plan = zeroed_outputs.new_plan()

    def run(*inputs):
        with zeroed_outputs.one_fill(plan):
            return call(*inputs)

    run.plan = plan
    return run


class OnlineTTT:
    """Online TTT behind the common method interface (`adapt(images) -> logits`, `reset()`).

    `train_source`, when given, supplies the images the ssl views come from (one view each), drawn afresh for
    every step inside the step (and so inside the CUDA graph): e.g. a batch from a window of recent video frames.
    Without it the views are `copies` augmented copies of each input, as in the paper. `streams` > 1 adds a
    `parallel` twin (ParallelOnlineTTT) for independent segments, when the config allows one.
    """

    name = "ttt-online"
    episodic = False

    def __init__(
        self,
        model: nn.Module,
        task,
        config: OnlineConfig,
        classes: int,
        generator: torch.Generator | None = None,
        train_source: Callable[[], torch.Tensor] | None = None,
        streams: int = 1,
    ):
        if config.reset.kind == "every" and config.reset.every % config.batch:
            raise TTAError(f"--reset every:{config.reset.every} must be a multiple of the online batch ({config.batch})")
        if config.skip_above is not None and not hasattr(task, "confidence"):
            raise TTAError(f"--skip-above needs a task with a confidence (rotation), not {task.name}")
        self.model = model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.task = task
        self.config = config
        self.generator = generator
        self.train_source = train_source
        self.device = next(model.parameters()).device
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        if config.cudnn_benchmark and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.weights = FlatParameters(model, adapted_parameter_names(model, config.params), config.channels_last)
        for param in self.weights.params:
            param.requires_grad_(True)
        flat = self.weights.flat
        self.source = flat.clone()
        self.snapshot = flat.clone()
        self.velocity = torch.zeros_like(flat)
        zero = torch.zeros((), device=self.device, dtype=torch.long)
        self.counts = {
            k: zero.clone()
            for k in ("updates", "skipped", "rollbacks", "rollbacks_to_source", "collapse_resets", "shift_resets", "good_steps", "strikes")
        }
        self.detector = ShiftDetector(config.reset, self.device) if config.reset.kind == "on-shift" else None
        self.window = PredictionWindow(config.rollback.window, classes, self.device) if config.rollback.enabled else None
        self.ssl_loss = torch.full((), float("nan"), device=self.device)  # first step's loss on the latest input
        self.samples_seen = 0
        self.scheduled_resets = 0
        self._graphs: dict[str, CapturedCall] = {}
        # independent segments (each from the source weights) side by side, up to `streams` at once, when nothing
        # in the config decides per sample; the runner hands it all segments at once (`adapt_streams`). The twin
        # gets its own copy of the model: it keeps torch's convolutions (vmap needs them) while this one-stream path
        # (one segment, as in the continual order) may take the Triton ones.
        self.parallel = None
        if streams > 1 and train_source is None and supports_parallel(config):
            amp = config.amp if config.parallel_amp is None else config.parallel_amp
            twin_config = dataclasses.replace(config, amp=amp)
            self.parallel = ParallelOnlineTTT(copy.deepcopy(model), task, twin_config, generator, max_streams=streams)
        if uses_triton_convs(config.conv_kernels, self.device):
            triton_conv.use_triton_convs(model)
            triton_norm.use_triton_norms(model)
        self._memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self._main_forward = self._forward("main")
        self._both_forward = maybe_compile(self._forward_both, config.compile, config.compile_backend)
        # The glue around the passes, compiled too: in the stream step it was ~70 small eager kernels a frame (the
        # window draw, crops, rotations, the loss, the update of weights, momentum and counters: ~115 us of 1,380)
        self._make_views = maybe_compile(self._views, config.compile, config.compile_backend, SAME_RANDOM_NUMBERS)
        self._ssl_outputs_and_loss = maybe_compile(self._outputs_and_loss, config.compile, config.compile_backend)
        self._apply = maybe_compile(self._apply_gradient, config.compile, config.compile_backend)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # overlapped predictions
        calls = {"step": self.step, "predict": self._predict, "update": self._update, "pipelined": self._pipelined, "overlapped": self._overlapped}
        self._calls = {kind: _with_one_fill(call) for kind, call in calls.items()}

    def _outputs_and_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ssl head's outputs for `inputs` and the task's loss on them (one compiled graph with its backward)."""
        outputs = self.model(inputs.contiguous(memory_format=self._memory_format), head="ssl")
        return outputs, self.task.loss(outputs, targets)

    def _forward(self, head: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model's forward through one head, compiled when asked (one compiled graph per head and shape)."""

        def forward(images: torch.Tensor) -> torch.Tensor:
            return self.model(images.contiguous(memory_format=self._memory_format), head=head)

        return maybe_compile(forward, self.config.compile, self.config.compile_backend)

    def _forward_both(
        self, earlier: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One encoder pass over [earlier; inputs]: main-head logits of `earlier`, ssl outputs of `inputs` and the
        task's loss on them. Exact because every normalization here is per sample (GroupNorm, LayerNorm, BatchNorm
        in eval mode)."""
        features = self.model.features(torch.cat([earlier, inputs]).contiguous(memory_format=self._memory_format))
        count = earlier.shape[0]
        outputs = self.model.ssl_head(features[count:])
        return self.model.main_head(features[:count]).detach(), outputs, self.task.loss(outputs, targets)

    # ---- the interface ----------------------------------------------------------------------
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

    def counters(self) -> dict:
        values = {k: int(v) for k, v in self.counts.items() if k not in ("good_steps", "strikes")}
        if self.parallel is not None:
            for name, value in self.parallel.counters().items():
                values[name] += value
        values["scheduled_resets"] = self.scheduled_resets
        values["resets"] = values["scheduled_resets"] + values["shift_resets"] + values["collapse_resets"]
        return values

    def adapt(self, images: torch.Tensor, update: bool = True) -> torch.Tensor:
        """images (B, C, H, W) with B == config.batch (the last batch may be smaller).

        update=False only predicts with the current weights (a stream that fell behind skips the update);
        the samples still count towards `--reset every:N`.
        """
        self._count(images)
        if self._use_graph(images):
            return self._replay("step" if update else "predict", images)
        return self._calls["step" if update else "predict"](images)

    def _count(self, images: torch.Tensor) -> None:
        """`images` are new samples: first the scheduled reset (`--reset every:N`) when N samples have passed."""
        policy = self.config.reset
        if policy.kind == "every" and self.samples_seen and self.samples_seen % policy.every == 0:
            self.reset()
            self.scheduled_resets += 1
        self.samples_seen += images.shape[0]

    def update(self, images: torch.Tensor) -> None:
        """Adapt on `images` without counting them as new samples: the second half of predicting first with
        `adapt(images, update=False)`, so that the prediction is ready before the update runs. Without rollback
        nothing needs the step's own logits, so only the update runs."""
        kind = "step" if self.window is not None else "update"
        self._run(kind, images)

    def prepare(self, images: torch.Tensor, kinds: tuple[str, ...] = ("step", "predict")) -> None:
        """Capture the CUDA graphs of `kinds` for inputs shaped like `images` now, so the first real input does not
        pay for it (the kinds in TWO_INPUTS take two such inputs: the earlier frame and this one)."""
        if self._use_graph(images):
            for kind in kinds:
                if kind not in self._graphs:
                    inputs = [images, images] if kind in TWO_INPUTS else [images]
                    self._graphs[kind] = CapturedCall(self._calls[kind], inputs, self._state_tensors())

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of `images` on the current weights; nothing changes and nothing is counted."""
        return self._run("predict", images)

    def _predictions_can_wait(self) -> bool:
        """Whether a sample's prediction (after its own update) may come out of the next sample's call, as
        adapt_sequence's pipeline and adapt_overlapped deliver it: nothing acts on it before that next update
        (rollback's collapse check), it is not wanted before its own update (pre-update), and no scheduled reset
        (every:N) replaces the weights in between."""
        config = self.config
        return not config.rollback.enabled and not config.pre_update and config.reset.kind != "every"

    def can_overlap(self) -> bool:
        """Whether adapt_overlapped may run: predictions can wait for the next update, and nothing writes the
        weights before that update's own write, while the prediction may still be reading them (a shift reset)."""
        return self.config.steps > 0 and self.detector is None and self._predictions_can_wait()

    def adapt_overlapped(self, images: torch.Tensor, earlier: torch.Tensor | None) -> torch.Tensor | None:
        """Update on `images` (counted as new samples) and return the logits of `earlier` on the weights before that
        update (None: no prediction).

        On CUDA the prediction runs on a side stream beside the update's forward and backward passes, which leave
        most of the chip idle, and joins before the weights change: one CUDA graph holds both. Elsewhere it simply
        runs first. A stream predicting each frame after its update can so hand frame t's prediction to frame t+1's
        call: the same weights, the same logits (tests/test_stream_loop.py), the prediction off the critical path.
        (Folding `earlier` into the update's first forward pass instead, as adapt_sequence's pipeline does, ran the
        stream step at 0.93x this on an H200: the encoder's backward then also runs on one more image, and the main
        head's 1-image pass runs in line; docs/speed-notes.md.)
        """
        if not self.can_overlap():
            raise ValueError("adapt_overlapped needs steps > 0 and no rollback, pre-update, every:N or shift reset (can_overlap)")
        self._count(images)
        if earlier is None:
            self._run("update", images)
            return None
        return self._run("overlapped", earlier, images)

    def can_pipeline(self) -> bool:
        """Whether adapt_sequence may fold predictions into the next update: asked for, on the paper's views (no
        train_source), and predictions can wait for the next update."""
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

    def _run(self, kind: str, *inputs: torch.Tensor) -> torch.Tensor | None:
        """One call of `kind`, replayed from its CUDA graph when every input is a whole batch."""
        if all(self._use_graph(x) for x in inputs):
            return self._replay(kind, *inputs)
        return self._calls[kind](*inputs)

    # ---- one step ---------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_bf16(self.device, self.config.amp):
            return full_precision(self._main_forward(images))

    def step(self, images: torch.Tensor) -> torch.Tensor:
        """Update on `images`, then their logits (before the update with pre_update); the collapse check."""
        config, counts = self.config, self.counts
        logits = self._predict(images) if config.pre_update else None
        self._update(images)
        if logits is None:
            logits = self._predict(images)
        if self.window is not None:
            self.window.update(logits.argmax(1))
            collapsed = self.window.collapsed(config.rollback.min_entropy)
            self._restore(collapsed, self.source, also_snapshot=True)
            self.window.clear(collapsed)
            counts["collapse_resets"] += collapsed.long()
        return logits

    def _overlapped(self, earlier: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Logits of `earlier` on the current weights, on the side stream, joined before the update on `images`
        writes the weights (adapt_overlapped)."""
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

    def _update(
        self, images: torch.Tensor, earlier: torch.Tensor | None = None, join: Callable[[], None] | None = None
    ) -> torch.Tensor | None:
        """`steps` updates on views of `images` (gate, shift reset, rollback as configured); with `earlier`, the
        first forward pass also yields, and this returns, the main-head logits of `earlier` on the weights before.
        `join`, when given, runs once after the first backward pass, before the weights change (the end of an
        overlapped prediction; adapt_overlapped refuses the shift reset, which writes them earlier)."""
        config, counts = self.config, self.counts
        earlier_logits = None
        for step_index in range(config.steps):
            inputs, targets = self._make_views(images)
            with autocast_bf16(self.device, self.config.amp):
                if earlier is not None and step_index == 0:
                    earlier_logits, outputs, loss = self._both_forward(earlier, inputs, targets)
                    earlier_logits = full_precision(earlier_logits)
                else:
                    outputs, loss = self._ssl_outputs_and_loss(inputs, targets)
            if step_index == 0:
                self.ssl_loss.copy_(loss.detach().float())
            gate = None  # always update
            if config.skip_above is not None:
                gate = (self.task.confidence(outputs, targets) <= config.skip_above).float()
            if self.detector is not None and step_index == 0:
                fired = self.detector.update(loss)
                self._restore(fired, self.source, also_snapshot=True)
                self.detector.clear(fired)
                counts["shift_resets"] += fired.long()
                kept = (~fired).float()  # the gradient belongs to the weights just replaced
                gate = kept if gate is None else gate * kept
            grads = torch.autograd.grad(loss, self.weights.params)
            if join is not None and step_index == 0:  # after the backward pass; a shift reset would write before it
                join()
            if config.rollback.enabled:  # held-out views of the same input judge the update
                check_inputs, check_targets = self._make_views(images)
                check_before = self._ssl_loss(check_inputs, check_targets)
            self._apply(list(grads), gate)
            if config.rollback.enabled:
                self._check_update(check_inputs, check_targets, check_before, gate)
        return earlier_logits

    def _apply_gradient(self, grads: list[torch.Tensor], gate: torch.Tensor | None) -> None:
        """The momentum update of the flat weights by `grads` (the adapted parameters' gradients, in order), where
        `gate` > 0 (None: always), and its count: one compiled kernel or two instead of a dozen."""
        config, counts, flat = self.config, self.counts, self.weights.flat
        grad = self.weights.flatten(grads)
        if gate is None:
            self.velocity.mul_(config.momentum).add_(grad)
            flat.sub_(self.velocity, alpha=config.lr)
            counts["updates"] += 1
            return
        self.velocity.copy_(torch.where(gate > 0, self.velocity * config.momentum + grad, self.velocity))
        flat.sub_(gate * self.velocity, alpha=config.lr)  # (lr as given: a float32 gate times lr would round it)
        counts["updates"] += gate.long()
        counts["skipped"] += (1 - gate).long()

    def _views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train_source is not None:
            return make_views(self.task, self.train_source(), 1, self.generator)
        return make_views(self.task, images, self.config.copies, self.generator)

    def _ssl_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_bf16(self.device, self.config.amp):
            return self._ssl_outputs_and_loss(inputs, targets)[1]

    def _check_update(self, inputs, targets, loss_before, gate: torch.Tensor | None) -> None:
        """Roll back an update that raised the ssl loss by more than the margin, measured on fresh
        views of the current input (the update's own views would reward over-fitting them); `gate` as the
        update's (None: it ran)."""
        policy, counts = self.config.rollback, self.counts
        loss_after = self._ssl_loss(inputs, targets)
        worse = ~(loss_after <= loss_before * (1.0 + policy.margin))  # a NaN loss after is worse too
        good = ~worse
        if gate is not None:  # a skipped update (gate 0) is neither
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

    def _restore(self, condition: torch.Tensor, target: torch.Tensor, also_snapshot: bool = False) -> None:
        flat = self.weights.flat
        flat.copy_(torch.where(condition, target, flat))
        self.velocity.copy_(torch.where(condition, torch.zeros_like(self.velocity), self.velocity))
        if also_snapshot:
            self.snapshot.copy_(torch.where(condition, target, self.snapshot))

    # ---- CUDA graph -------------------------------------------------------------------------
    def _use_graph(self, images: torch.Tensor) -> bool:
        return self.config.cuda_graph and self.device.type == "cuda" and images.shape[0] == self.config.batch

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = [self.weights.flat, self.snapshot, self.velocity, *self.counts.values()]
        if self.detector is not None:
            tensors += [self.detector.losses, self.detector.count]
        if self.window is not None:
            tensors += [self.window.predictions, self.window.count]
        return tensors

    def _replay(self, kind: str, *inputs: torch.Tensor) -> torch.Tensor | None:
        """kind "step" (update, then the step's logits), "predict" (logits only), "update" (no logits) or
        "pipelined" (logits of the first input, update on the second); each captured once."""
        if kind not in self._graphs:
            self._graphs[kind] = CapturedCall(self._calls[kind], inputs, self._state_tensors())
        logits = self._graphs[kind](*inputs)
        return None if logits is None else logits.clone()
