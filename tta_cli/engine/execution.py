"""ExecutionSettings resolved for one device, once: what each fast path will actually do there."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta_cli.config import ExecutionSettings
from tta_cli.kernels import triton_conv

# bf16 autocast where ExecutionSettings.amp is None, per path: what measured faster for the reference ResNet-26 on
# CUDA (docs/speed-notes.md). A 0.64M-parameter online step pays more for the casts than bf16 saves.
AMP_DEFAULTS = {"episodic": True, "online": False, "parallel": True, "plain": False}
CUDA_CHUNK = 512  # ttt samples per chunk on CUDA, clipped to free memory (docs/speed-notes.md: auto-sizing measured slower)
CPU_CHUNK = 8  # on the CPU small chunks are fastest: larger per-sample buffers are paged in afresh every step
CUDA_STREAMS = 256


@dataclass(frozen=True)
class Execution:
    """Concrete choices on `device`; `amp(path)` is the precision of one path ("episodic", "online", ...)."""

    device: torch.device
    amp_setting: bool | None
    compile: bool
    cuda_graph: bool
    triton_kernels: bool
    pipeline: bool
    overlap: bool
    per_sample: str
    chunk: int | None  # None (CUDA): CUDA_CHUNK clipped to free memory at the first chunk (EpisodicTTT.auto_chunk)
    streams: int

    def amp(self, path: str) -> bool:
        return AMP_DEFAULTS[path] if self.amp_setting is None else self.amp_setting


def uses_triton_kernels(conv_kernels: str, device: torch.device) -> bool:
    """"auto" on CUDA only (the CPU would run them through Triton's interpreter, which only the tests want),
    "triton" wherever Triton can run."""
    wanted = conv_kernels == "triton" or (conv_kernels == "auto" and device.type == "cuda")
    return wanted and triton_conv.available(device)


def resolve(settings: ExecutionSettings, device: torch.device) -> Execution:
    settings.validate()
    cuda = device.type == "cuda"
    return Execution(
        device=device,
        amp_setting=settings.amp,
        compile=settings.compile and cuda,
        cuda_graph=settings.cuda_graph and cuda,
        triton_kernels=uses_triton_kernels(settings.conv_kernels, device),
        pipeline=settings.pipeline,
        overlap=settings.overlap,
        per_sample=("vmap" if cuda else "grouped") if settings.per_sample == "auto" else settings.per_sample,
        chunk=settings.chunk if settings.chunk is not None or cuda else CPU_CHUNK,
        streams=settings.streams if settings.streams is not None else (CUDA_STREAMS if cuda else 1),
    )
