"""Episodic TTT: every test sample starts from the trained weights, takes `steps` SGD steps on the
self-supervised loss of `copies` augmented views of itself, then is classified by the main head.

The fast path adapts a chunk of samples at once with per-sample weights (torch.func: vmap over
grad of a functional call); `adapt_sequential` is its slow, obviously correct twin, and both draw
identical views from the same generator, so they give the same result.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tta_cli.adapt.params import adapted_parameter_names
from tta_cli.adapt.views import full_precision, make_views


@dataclass
class EpisodicConfig:
    steps: int = 10
    lr: float = 0.001
    copies: int = 32
    momentum: float = 0.0
    params: str = "encoder"
    skip_above: float | None = None  # skip a step when the rotation head's confidence exceeds this
    chunk: int | None = None  # samples adapted together; None sizes it to free GPU memory
    amp: bool = True  # bf16 autocast on CUDA


def split_state(model: nn.Module, names: list[str]) -> tuple[dict, dict]:
    """(adapted parameters, everything else incl. buffers), detached."""
    adapted, frozen = {}, {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        (adapted if name in names else frozen)[name] = tensor.detach()
    return adapted, frozen


class EpisodicTTT:
    """Batched episodic TTT behind the common method interface (`adapt(images) -> logits`)."""

    name = "ttt"
    episodic = True

    def __init__(self, model: nn.Module, task, config: EpisodicConfig, generator: torch.Generator | None = None):
        self.model = model.eval()  # BatchNorm uses its running statistics: per-sample results stay independent
        self.task = task
        self.config = config
        self.generator = generator
        self.names = adapted_parameter_names(model, config.params)
        self.source, self.frozen = split_state(model, self.names)
        self.skipped = 0
        self.device = next(model.parameters()).device
        self._chunk = config.chunk

    def reset(self) -> None:
        """Nothing to reset: the live model is never modified."""

    def counters(self) -> dict:
        return {"skipped_steps": int(self.skipped)}

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        chunk = self._chunk or self.auto_chunk(images)
        return torch.cat([self.adapt_chunk(part) for part in images.split(chunk)])

    def _autocast(self):
        enabled = self.config.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def adapt_chunk(self, images: torch.Tensor) -> torch.Tensor:
        """images (S, C, H, W) -> logits (S, classes), each sample adapted on its own weights."""
        samples = images.shape[0]
        config = self.config
        params = {n: p.unsqueeze(0).repeat(samples, *([1] * p.dim())) for n, p in self.source.items()}
        velocity = {n: torch.zeros_like(p) for n, p in params.items()} if config.momentum else None
        frozen, task, model = self.frozen, self.task, self.model

        def sample_loss(sample_params, inputs, targets):
            outputs = functional_call(model, (sample_params, frozen), (inputs,), {"head": "ssl"})
            loss = task.loss(outputs, targets)
            confidence = task.confidence(outputs, targets) if config.skip_above is not None else loss.detach()
            return loss, confidence

        per_sample_grad = vmap(grad(sample_loss, has_aux=True))
        for _ in range(config.steps):
            inputs, targets = make_views(task, images, config.copies, self.generator)
            inputs = inputs.reshape(samples, config.copies, *inputs.shape[1:])  # (S, copies, C, H, W)
            targets = targets.reshape(samples, config.copies, *targets.shape[1:])
            with self._autocast():
                grads, confidence = per_sample_grad(params, inputs, targets)
            keep = None
            if config.skip_above is not None:
                keep = (confidence <= config.skip_above).float()  # (S,)
                self.skipped += (samples - keep.sum()).detach()
            for name, param in params.items():
                step = grads[name].to(param.dtype)
                gate = 1.0 if keep is None else keep.view(-1, *([1] * (step.dim() - 1)))
                if velocity is not None:  # a skipped step leaves both velocity and weights untouched
                    velocity[name] += gate * (velocity[name] * (config.momentum - 1.0) + step)
                    step = velocity[name]
                param.sub_(config.lr * gate * step)

        def predict(sample_params, image):
            return functional_call(model, (sample_params, frozen), (image.unsqueeze(0),)).squeeze(0)

        with torch.no_grad(), self._autocast():
            return full_precision(vmap(predict)(params, images))

    def auto_chunk(self, images: torch.Tensor) -> int:
        """On CUDA, measure one step's memory per sample on a small probe chunk and fill ~70% of free memory."""
        if self.device.type != "cuda":
            self._chunk = 64
            return self._chunk
        probe = min(8, images.shape[0])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        saved_generator_state = self.generator.get_state() if self.generator is not None else None
        probe_config = self.config
        self.config = dataclasses.replace(probe_config, steps=1)
        try:
            self.adapt_chunk(images[:probe])
        finally:
            self.config = probe_config
            if saved_generator_state is not None:
                self.generator.set_state(saved_generator_state)
        torch.cuda.synchronize()
        per_sample = max((torch.cuda.max_memory_allocated() - base) / probe, 1)
        free, _ = torch.cuda.mem_get_info()
        self._chunk = int(max(1, min(images.shape[0], 4096, 0.7 * free // per_sample)))
        return self._chunk


def adapt_sequential(model: nn.Module, task, config: EpisodicConfig, images: torch.Tensor, generator=None) -> torch.Tensor:
    """The reference: one sample at a time, a fresh copy of the model, torch.optim.SGD, plain autograd.

    Views are drawn for the whole chunk each step in the same order as the batched path, so both
    consume the generator identically.
    """
    names = set(adapted_parameter_names(model, config.params))
    copies_of_model = [copy.deepcopy(model).eval() for _ in range(images.shape[0])]
    optimizers = [
        torch.optim.SGD([p for n, p in m.named_parameters() if n in names], lr=config.lr, momentum=config.momentum)
        for m in copies_of_model
    ]
    for _ in range(config.steps):
        inputs, targets = make_views(task, images, config.copies, generator)
        inputs = inputs.reshape(images.shape[0], config.copies, *inputs.shape[1:])
        targets = targets.reshape(images.shape[0], config.copies, *targets.shape[1:])
        for index, (sample_model, optimizer) in enumerate(zip(copies_of_model, optimizers)):
            outputs = sample_model(inputs[index], head="ssl")
            if config.skip_above is not None and task.confidence(outputs, targets[index]) > config.skip_above:
                continue
            optimizer.zero_grad()
            task.loss(outputs, targets[index]).backward()
            optimizer.step()
    with torch.no_grad():
        return torch.cat([m(images[i : i + 1]) for i, m in enumerate(copies_of_model)])
