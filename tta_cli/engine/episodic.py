"""Episodic TTT: every test sample starts from the trained weights, takes `steps` SGD steps on the
self-supervised loss of `copies` augmented views of itself, then is classified by the main head.

The fast path adapts a chunk of samples at once with per-sample weights (`PerSampleModel`: vmap over
grad of a functional call); `adapt_sequential` is its slow, obviously correct twin, and both draw
identical views from the same generator, so they give the same result.

Sharded over torchrun ranks (`adapt_shard`), each rank adapts every world_size-th chunk and only draws
(and discards) the views of the others, so every chunk sees the generator state, and so the views, of a
single-process run: the sharded predictions equal the single-process ones exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tta_cli import distributed
from tta_cli.engine import grouped
from tta_cli.engine.execution import CPU_CHUNK, CUDA_CHUNK
from tta_cli.engine.per_sample import PerSampleModel, UpdateConfig, adapt_streams_reference, check_per_sample
from tta_cli.engine.weight_cache import WeightCache
from tta_cli.errors import TTAError
from tta_cli.models.params import adapted_parameter_names
from tta_cli.tasks.views import make_views


@dataclass
class EpisodicConfig(UpdateConfig):
    steps: int = 10
    skip_above: float | None = None  # skip a step when the rotation head's confidence exceeds this
    chunk: int | None = None  # samples adapted together; None: CUDA_CHUNK clipped to free GPU memory (CPU_CHUNK on the CPU)
    amp: bool = True  # bf16 autocast on CUDA
    compile: bool = False  # torch.compile the per-sample gradient (CUDA; the last chunk is padded)
    cache: float | None = None  # reuse a cached sample's adapted weights at source-embedding cosine >= this (None: off)
    cache_size: int = 256  # adapted samples the cache keeps (the most recent)


class EpisodicTTT:
    """Batched episodic TTT behind the common method interface (`adapt(images) -> logits`)."""

    name = "ttt"
    episodic = True

    def __init__(self, model: nn.Module, task, config: EpisodicConfig, generator: torch.Generator | None = None):
        check_per_sample(config)  # here, not only when the first chunk builds its per-sample model
        self.model = model.eval()  # BatchNorm uses its running statistics: per-sample results stay independent
        self.task = task
        self.config = config
        self.generator = generator
        self.names = adapted_parameter_names(model, config.params)
        self.skipped = 0
        self.device = next(model.parameters()).device
        self._chunk = config.chunk
        self._functions: PerSampleModel | None = None
        self._chunks_seen = 0  # chunks drawn so far (adapted or skipped), to deal chunks to ranks in turn
        self.cache = None if config.cache is None else WeightCache(config.cache, config.cache_size)

    def reset(self) -> None:
        """Nothing to reset: the live model is never modified."""

    def counters(self) -> dict:
        return {"skipped_steps": int(self.skipped), **(self.cache.counters() if self.cache is not None else {})}

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        chunk = self._chunk or self.auto_chunk(images)
        if self.cache is not None:
            return self.cache.adapt(self, images, chunk)
        return torch.cat([self.adapt_chunk(part) for part in images.split(chunk)])

    def adapt_shard(self, images: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of `adapt(images)`: chunk k of the run (counted across calls) is adapted by rank
        k % world_size and skipped by the others. Returns (rows adapted (R,), their logits (R, classes))."""
        if self.cache is not None:
            raise TTAError("the adapted-weight cache runs in one process: its hits depend on every earlier sample")
        if self._chunk is None:  # ranks must cut identical chunks: the smallest memory-sized chunk wins
            self._chunk = distributed.min_over_ranks(self.auto_chunk(images))
        rows, logits = [], []
        for start in range(0, images.shape[0], self._chunk):
            part = images[start : start + self._chunk]
            if self._chunks_seen % world_size == rank:
                rows.append(torch.arange(start, start + part.shape[0], device=images.device))
                logits.append(self.adapt_chunk(part))
            else:
                self.skip_chunk(part)
            self._chunks_seen += 1
        if not rows:
            return torch.empty(0, dtype=torch.long, device=images.device), images.new_empty(0, 0)
        return torch.cat(rows), torch.cat(logits)

    def skip_chunk(self, images: torch.Tensor) -> None:
        """Draw the views `adapt_chunk(images)` would draw, and nothing else: keeps the generator in step."""
        images, _ = self._static_shape(images)
        for _ in range(self.config.steps):
            make_views(self.task, images, self.config.copies, self.generator)

    def _static_shape(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(images padded to the chunk size when compiled, so the compiled code keeps one shape; real rows)."""
        real = images.shape[0]
        if self.config.compile and self._chunk and real < self._chunk:
            images = torch.cat([images, images[-1:].expand(self._chunk - real, *images.shape[1:])])
        return images, real

    def adapt_chunk(self, images: torch.Tensor) -> torch.Tensor:
        """images (S, C, H, W) -> logits (S, classes), each sample adapted on its own weights."""
        return self.adapt_chunk_and_weights(images)[0]

    def adapt_chunk_and_weights(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits (S, classes), each sample's adapted weights: (S, *shape) per adapted name)."""
        config = self.config
        functions = self.functions()
        images, real = self._static_shape(images)
        params = functions.repeated_source(images.shape[0])
        velocity = [torch.zeros_like(p) for p in params] if config.momentum else None
        skipped = functions.sgd_steps(params, velocity, images, config, self.generator)
        self.skipped += skipped[:real].sum()  # the padding rows do not count
        return functions.predict(params, images)[:real], [param[:real] for param in params]

    def predict_with(self, params: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Logits (S, classes) of images (S, C, H, W), sample s on the weights params[.][s] (padded when compiled)."""
        padded, real = self._static_shape(images)
        if padded.shape[0] > real:
            params = [torch.cat([p, p[-1:].expand(padded.shape[0] - real, *p.shape[1:])]) for p in params]
        return self.functions().predict(params, padded)[:real]

    def functions(self) -> PerSampleModel:
        if self._functions is None:
            self._functions = grouped.per_sample_model(self.model, self.task, self.names, self.config)
        return self._functions

    def batch_size(self, sample: torch.Tensor) -> int:
        """How many samples a runner should hand `adapt` at once: four whole chunks (sized on `sample` if not yet),
        so progress shows every four chunks and only the last chunk of a set is short (padded when compiled)."""
        return 4 * (self._chunk or self.auto_chunk(sample))

    def auto_chunk(self, images: torch.Tensor) -> int:
        """On CUDA, CUDA_CHUNK samples, or fewer where one step's memory per sample (measured on a small probe chunk)
        would fill more than ~70% of free memory; on the CPU, CPU_CHUNK (docs/speed-notes.md)."""
        if self.device.type != "cuda":
            self._chunk = CPU_CHUNK
            return self._chunk
        probe = min(8, images.shape[0])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        saved_generator_state = self.generator.get_state() if self.generator is not None else None
        probe_config = self.config
        self.config = dataclasses.replace(probe_config, steps=1, compile=False)  # eager over-estimates: safe
        self._functions = None
        try:
            self.adapt_chunk(images[:probe])
        finally:
            self.config = probe_config
            self._functions = None
            if saved_generator_state is not None:
                self.generator.set_state(saved_generator_state)
        torch.cuda.synchronize()
        per_sample = max((torch.cuda.max_memory_allocated() - base) / probe, 1)
        free, _ = torch.cuda.mem_get_info()
        free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # cached by PyTorch's allocator: reusable
        self._chunk = int(max(8, min(CUDA_CHUNK, 0.7 * free // per_sample)) // 8 * 8)
        return self._chunk


def adapt_sequential(model: nn.Module, task, config: EpisodicConfig, images: torch.Tensor, generator=None) -> torch.Tensor:
    """The reference: one sample at a time, a fresh copy of the model, torch.optim.SGD, plain autograd; each
    sample is a stream of one (`adapt_streams_reference`), so views are drawn for the whole chunk each step in
    the same order as the batched path, and both consume the generator identically."""
    singletons = [torch.tensor([index], device=images.device) for index in range(images.shape[0])]
    return torch.cat(adapt_streams_reference(model, task, config, images, singletons, generator))
