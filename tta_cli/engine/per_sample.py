"""Many independent copies of one network, each with its own adapted weights, in one batched call.

torch.func turns the model's ssl loss into per-sample gradients (vmap over grad of a functional call) and
its main head into per-sample predictions; the weights that do not adapt stay shared, so their layers run
as ordinary batched layers. Episodic TTT (one copy per test sample, reset after each) and parallel online TTT
(one copy per independent stream, carried over) are both built on it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tta_cli.config import PER_SAMPLE
from tta_cli.engine.compiled import maybe_compile
from tta_cli.engine.precision import autocast_bf16, full_precision
from tta_cli.errors import TTAError
from tta_cli.models.batchnorm import with_affine_eval_batchnorm
from tta_cli.models.params import adapted_parameter_names
from tta_cli.tasks.views import grouped_views


@dataclass
class UpdateConfig:
    """The ssl update of episodic and online TTT: `steps` SGD steps (`lr`, `momentum`) on `copies` augmented
    views of the input, moving the `params` group."""

    steps: int = 1
    lr: float = 0.001
    copies: int = 32
    momentum: float = 0.0
    params: str = "encoder"
    # How copies with their own weights (episodic samples, parallel online streams) are computed: "vmap" (torch.func,
    # any model) or "grouped" (the CIFAR pre-activation ResNet with rotation folded into grouped convolutions:
    # engine/grouped.py; other models keep vmap). Equal results (float64-tested). "auto": the faster on the device
    # (grouped on the CPU, vmap on CUDA: docs/speed-notes.md).
    per_sample: str = "auto"


def check_per_sample(config: UpdateConfig) -> None:
    """A one-line user error for an unknown `per_sample`, raised before any work (build_methods builds every
    method first)."""
    if config.per_sample not in PER_SAMPLE:
        raise TTAError(f"unknown per_sample {config.per_sample!r}; choose one of: {', '.join(PER_SAMPLE)}")


def split_state(model: nn.Module, names: list[str]) -> tuple[dict, dict]:
    """(adapted parameters, everything else incl. buffers), detached."""
    adapted, frozen = {}, {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        (adapted if name in names else frozen)[name] = tensor.detach()
    return adapted, frozen


class PerSampleModel:
    """`sgd_steps(params, ...)`, `gradients(params, inputs, targets)` and `predict(params, images)` over a leading
    copy dimension S: params lists each adapted weight as (S, *shape) in `names` order, inputs (S, views, C, H, W),
    images (S, C, H, W). `amp`: bf16 autocast on CUDA for the forward and backward passes."""

    def __init__(self, model: nn.Module, task, names: list[str], with_confidence: bool = False, compile: bool = False, amp: bool = False):
        self.names = names
        self.task = task
        self.amp = amp
        adapted, self.frozen = split_state(model, names)
        self.source = {name: tensor.clone() for name, tensor in adapted.items()}  # a copy: the live weights may move
        self._gradients, self._predict = self._build(with_affine_eval_batchnorm(model), task, with_confidence, compile)

    def _build(self, model: nn.Module, task, with_confidence: bool, compile: bool):
        """(gradients(params dict, inputs, targets) -> (grads dict, confidence), predict(params dict, images) -> logits),
        both over the copy dimension: here vmap over a functional call of the model."""
        frozen = self.frozen

        def sample_loss(sample_params, inputs, targets):
            outputs = functional_call(model, (sample_params, frozen), (inputs,), {"head": "ssl"})
            loss = task.loss(outputs, targets)
            confidence = task.confidence(outputs, targets) if with_confidence else loss.detach()
            return loss, confidence

        def predict(sample_params, image):
            return functional_call(model, (sample_params, frozen), (image.unsqueeze(0),)).squeeze(0)

        return maybe_compile(vmap(grad(sample_loss, has_aux=True)), compile), maybe_compile(vmap(predict), compile)

    def repeated_source(self, copies: int) -> list[torch.Tensor]:
        """The source weights, `copies` times each: (copies, *shape) per adapted name, in `names` order."""
        return [self.source[n].unsqueeze(0).repeat(copies, *([1] * self.source[n].dim())) for n in self.names]

    def gradients(self, params: list[torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor):
        """(per-copy gradients in `names` order, per-copy confidence (S,) or the loss when not asked)."""
        with autocast_bf16(inputs.device, self.amp):
            grads, confidence = self._gradients(dict(zip(self.names, params, strict=True)), inputs, targets)
        return [grads[n].to(p.dtype) for n, p in zip(self.names, params, strict=True)], confidence

    def predict(self, params: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Main-head logits (S, classes) of each copy's image on its own weights, in full precision."""
        with torch.no_grad(), autocast_bf16(images.device, self.amp):
            return full_precision(self._predict(dict(zip(self.names, params, strict=True)), images))

    def sgd_steps(self, params, velocity, images: torch.Tensor, config, generator=None, active: torch.Tensor | None = None):
        """`config.steps` momentum-SGD steps of every copy on its own `config.copies` views of its image, in place.
        A copy whose `active` (S,) entry is 0, or whose ssl head is confident past `config.skip_above` at a step,
        keeps its weights and velocity at that step. Returns the steps each copy skipped for confidence (S,)."""
        dtype = params[0].dtype  # gates in the weights' dtype: a float32 gate would round lr in float64 runs
        skipped = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        activity = None if active is None else active.to(dtype)
        for _ in range(config.steps):
            inputs, targets = grouped_views(self.task, images, config.copies, generator)  # (S, copies, ...)
            steps, confidence = self.gradients(params, inputs, targets)
            keep = activity
            if config.skip_above is not None:
                confident = (confidence > config.skip_above).to(dtype)
                live = torch.ones_like(confident) if keep is None else keep
                skipped += (confident * live).long()
                keep = (1.0 - confident) * live
            sgd_step(params, velocity, steps, config.lr, config.momentum, keep)
        return skipped


class PerSampleLoss(PerSampleModel):
    """PerSampleModel for a loss the method writes: `loss(forward, *inputs) -> scalar` for one copy, where
    `forward(images, head="main")` runs the model on that copy's weights. `loss_gradients(params, *inputs)` is its
    gradient per copy (vmap over grad), every input with the copy dimension first."""

    def __init__(self, model: nn.Module, names: list[str], loss, amp: bool = False):
        self.loss = loss
        super().__init__(model, None, names, amp=amp)

    def _build(self, model: nn.Module, task, with_confidence: bool, compile: bool):
        frozen, loss = self.frozen, self.loss

        def sample_loss(sample_params, *inputs):
            def forward(images, head="main"):
                return functional_call(model, (sample_params, frozen), (images,), {"head": head})

            return loss(forward, *inputs)

        def predict(sample_params, image):
            return functional_call(model, (sample_params, frozen), (image.unsqueeze(0),)).squeeze(0)

        return vmap(grad(sample_loss)), vmap(predict)

    def loss_gradients(self, params: list[torch.Tensor], *inputs: torch.Tensor) -> list[torch.Tensor]:
        with autocast_bf16(inputs[0].device, self.amp):
            grads = self._gradients(dict(zip(self.names, params, strict=True)), *inputs)
        return [grads[n].to(p.dtype) for n, p in zip(self.names, params, strict=True)]


def sgd_step(params, velocity, steps, lr: float, momentum: float, keep: torch.Tensor | None) -> None:
    """In place, per copy: params -= lr * (momentum-SGD step), only where keep (S,) is 1. A skipped copy leaves
    both its velocity and its weights untouched. keep=None and no momentum is the plain fused update."""
    if keep is None and velocity is None:
        torch._foreach_add_(params, steps, alpha=-lr)
        return
    for index, param in enumerate(params):
        step = steps[index]
        gate = 1.0 if keep is None else keep.view(-1, *([1] * (step.dim() - 1)))
        if velocity is not None:
            velocity[index] += gate * (velocity[index] * (momentum - 1.0) + step)
            step = velocity[index]
        param.sub_(lr * gate * step)


def adapt_streams_reference(model: nn.Module, task, config, images: torch.Tensor, streams: list[torch.Tensor], generator=None):
    """The slow twin of both batched paths: one model copy and torch.optim.SGD per stream, plain autograd, one
    stream at a time. images float (N, C, H, W); each stream indexes into it and is adapted in order from the
    source weights, `config.steps` SGD steps per sample, each sample predicted after its steps. Views are drawn
    for every stream's current sample at once, per step, exactly as the batched paths draw them. Episodic TTT is
    the case of streams of one sample each."""
    names = set(adapted_parameter_names(model, config.params))
    models = [copy.deepcopy(model).eval() for _ in streams]
    optimizers = [
        torch.optim.SGD([p for n, p in m.named_parameters() if n in names], lr=config.lr, momentum=config.momentum) for m in models
    ]
    lengths = [len(s) for s in streams]
    outputs = [[] for _ in streams]
    dtype = next(model.parameters()).dtype
    for position in range(max(lengths)):
        rows = torch.stack([s[min(position, len(s) - 1)] for s in streams])
        current = images[rows].to(dtype)
        for _ in range(config.steps):
            inputs, targets = grouped_views(task, current, config.copies, generator)  # (S, copies, ...)
            for row, (stream_model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
                if position >= lengths[row]:
                    continue
                outputs_ssl = stream_model(inputs[row], head="ssl")
                if config.skip_above is not None and task.confidence(outputs_ssl, targets[row]) > config.skip_above:
                    continue
                optimizer.zero_grad()
                task.loss(outputs_ssl, targets[row]).backward()
                optimizer.step()
        with torch.no_grad():
            for row, stream_model in enumerate(models):
                if position < lengths[row]:
                    outputs[row].append(stream_model(current[row : row + 1]))
    return [torch.cat(rows) for rows in outputs]
