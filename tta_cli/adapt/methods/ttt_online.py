"""Online test-time training (Sun et al. 2020): the episodic update, but the weights carry over from sample to
sample through the stream (implicit memory), with optional reset, rollback and confidence gate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.methods.ttt import check_confidence
from tta_cli.adapt.online import OnlineConfig, OnlineTTT
from tta_cli.adapt.policies import ResetPolicy, RollbackPolicy
from tta_cli.config import OnlineSettings
from tta_cli.engine.execution import Execution, resolve


@dataclass
class TTTOnlineSettings:
    steps: int = 1  # SGD steps per batch of consecutive samples; the shared --steps overrides it


def online_config(settings: OnlineSettings, execution: Execution, steps: int, **changes) -> OnlineConfig:
    """The OnlineTTT configuration of the shared online settings (`tta adapt` and `tta stream` alike)."""
    values = dict(
        steps=steps, lr=settings.lr, copies=settings.copies, momentum=settings.momentum, params=settings.params,
        per_sample=execution.per_sample, reset=ResetPolicy.parse(settings.reset),
        rollback=RollbackPolicy(enabled=settings.rollback, margin=settings.rollback_margin, min_entropy=settings.collapse_entropy),
        pre_update=settings.pre_update, amp=execution.amp("online"), parallel_amp=execution.amp("parallel"),
        cuda_graph=execution.cuda_graph, compile=execution.compile, conv_kernels="triton" if execution.triton_kernels else "torch",
        pipeline=execution.pipeline,
    )
    return OnlineConfig(**{**values, **changes})


def online_generator(settings: OnlineSettings, execution: Execution) -> torch.Generator | None:
    """The views' generator: CUDA-graph capture draws from the default CUDA generator (seeded here), else its own."""
    if execution.cuda_graph:
        torch.cuda.manual_seed(settings.seed)
        return None
    return torch.Generator(device=execution.device).manual_seed(settings.seed)


@register
class TTTOnline(Method):
    name = "ttt-online"
    takes_sequences = True
    semantics = (
        "Online: the ttt update, weights carried across the stream in `order`; reset per `reset` and at each segment; "
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
        self.online = OnlineTTT(model, task, config, classes, online_generator(common, execution), streams=execution.streams)
        self.amp = config.amp

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        return self.online.adapt(images)

    def adapt_sequence(self, images: torch.Tensor) -> torch.Tensor:
        return self.online.adapt_sequence(images)

    def reset(self) -> None:
        self.online.reset()

    def counters(self) -> dict[str, int]:
        return self.online.counters()

    def batch_size(self, sample: torch.Tensor) -> int:
        return self.common.batch

    def side_by_side(self, segments: int) -> bool:
        return self.online.parallel is not None and segments > 1

    def adapt_streams(self, images, streams, on_step):
        return self.online.parallel.adapt_streams(images, streams, on_step)

    def precision(self, side_by_side: bool = False) -> str:
        path = self.online.parallel if side_by_side else self.online
        if path.config.amp and self.device.type == "cuda":
            return "bf16 autocast"
        return super().precision()

    def convolutions(self, side_by_side: bool = False) -> str:
        from tta_cli.models import triton_conv

        return triton_conv.kernels_in(self.online.parallel.model if side_by_side else self.model)
