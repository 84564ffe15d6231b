"""The configuration of online methods, built once from the shared settings for `tta adapt` and `tta stream` alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tta_cli.adapt.policies import ResetPolicy, RollbackPolicy
from tta_cli.config import OnlineSettings
from tta_cli.engine.execution import Execution
from tta_cli.engine.per_sample import UpdateConfig


@dataclass
class OnlineConfig(UpdateConfig):
    """The update (UpdateConfig), its policies, and how it runs (resolved: engine/execution.py)."""

    batch: int = 1  # consecutive samples adapted together
    skip_above: float | None = None  # skip an update when the rotation head's confidence exceeds this
    reset: ResetPolicy = field(default_factory=ResetPolicy)
    rollback: RollbackPolicy = field(default_factory=RollbackPolicy)
    pre_update: bool = False  # predict before the update (lowest latency) instead of after
    forget: float | None = None  # decay toward the source weights after every step (policies.PolicyState); None: none
    amp: bool = True  # bf16 autocast on CUDA
    cuda_graph: bool = True  # capture the calls on CUDA
    compile: bool = False  # torch.compile the passes (and so their backward), then captured in the graphs like any kernel
    pipeline: bool = False  # adapt_sequence: predict each batch inside the next batch's first forward pass (same result)
    conv_kernels: str = "torch"  # torch | triton: who runs the convolutions and norms (triton: kernels/, where faster)


def online_config(settings: OnlineSettings, execution: Execution, steps: int, **changes) -> OnlineConfig:
    """The OnlineConfig of the shared online settings on one device; `changes` override single fields."""
    values = dict(
        steps=steps, lr=settings.lr, copies=settings.copies, momentum=settings.momentum, params=settings.params,
        per_sample=execution.per_sample, reset=ResetPolicy.parse(settings.reset),
        rollback=RollbackPolicy(enabled=settings.rollback, margin=settings.rollback_margin, min_entropy=settings.collapse_entropy),
        pre_update=settings.pre_update, forget=settings.forget, amp=execution.amp("online"),
        cuda_graph=execution.cuda_graph, compile=execution.compile,
        pipeline=execution.pipeline, conv_kernels="triton" if execution.triton_kernels else "torch",
    )
    return OnlineConfig(**{**values, **changes})


def online_generator(settings: OnlineSettings, execution: Execution) -> torch.Generator | None:
    """The views' generator: CUDA-graph capture draws from the default CUDA generator (seeded here), else its own."""
    if execution.cuda_graph:
        torch.cuda.manual_seed(settings.seed)
        return None
    return torch.Generator(device=execution.device).manual_seed(settings.seed)

