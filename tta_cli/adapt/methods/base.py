"""The interface every adaptation method implements (`Method`); the runner and the CLI know methods only through it.
`OnlineMethod` is its common form for a method whose maths is one online stream."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from tta_cli.adapt.online import online_config, online_generator
from tta_cli.adapt.policies import check_confidence
from tta_cli.engine.execution import resolve
from tta_cli.engine.parallel_online import ParallelOnlineTTT, supports_parallel


@dataclass
class NoSettings:
    """For a method without hyper-parameters of its own."""


class Method:
    """One test-time adaptation method: `adapt(images) -> logits` on a stream of batches, `reset()` between segments.

    A subclass sets the class attributes, takes its own hyper-parameters as `settings` (an instance of its
    `Settings` dataclass) and the shared ones (seed, lr, steps, copies, execution, ...) as `common`, and overrides
    the optional capabilities below only when it has them.
    """

    name: ClassVar[str]
    episodic: ClassVar[bool] = False  # every sample on its own (so split over processes) rather than a stream
    semantics: ClassVar[str] = ""  # what it computes, in one paragraph (help text, results.json)
    updates: ClassVar[str] = "nothing"  # which parameters move
    default_batch: ClassVar[int] = 1  # samples handed to adapt() at once (under torchrun; see batch_size)
    Settings: ClassVar[type] = NoSettings
    takes_sequences: ClassVar[bool] = False  # adapt_sequence is faster than adapt() batch by batch
    moves_params: ClassVar[bool] = False  # updates the shared `params` group (so `--params adapters` gives it adapters)

    def __init__(self, model: nn.Module, task, settings: Any, common: Any, classes: int, device: torch.device):
        self.model = model
        self.task = task
        self.settings = settings
        self.common = common
        self.classes = classes
        self.device = device
        self.amp = False  # bf16 autocast (on CUDA only); the subclass decides

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1] on the device -> logits (B, classes)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the source weights (the runner calls it before every segment)."""

    def counters(self) -> dict[str, int]:
        return {}

    # ---- optional capabilities, with the defaults of a method that has none -----------------
    def batch_size(self, sample: torch.Tensor) -> int:
        """Samples a single process hands adapt() at once, given a few samples to size on."""
        return self.default_batch

    def adapt_sequence(self, images: torch.Tensor) -> torch.Tensor:
        """All of `images` (N, 3, H, W) in order: the logits of adapt() on consecutive batches."""
        return torch.cat([self.adapt(part) for part in images.split(self.batch_size(images[:8]))])

    def adapt_shard(self, images: torch.Tensor, batch_number: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (rows (R,), logits (R, classes)) of batch `batch_number`: whole batches in turn, so each batch
        is computed exactly as in a single process."""
        if batch_number % world_size != rank:
            return torch.empty(0, dtype=torch.long, device=images.device), images.new_empty(0, 0)
        return torch.arange(images.shape[0], device=images.device), self.adapt(images)

    def side_by_side(self, segments: int) -> bool:
        """Whether `segments` independent segments go to adapt_streams at once instead of one after another."""
        return False

    def adapt_streams(self, images: torch.Tensor, streams: list[torch.Tensor], on_step) -> list[torch.Tensor]:
        """images uint8 (N, H, W, 3); each stream (indices into it) adapted from the source weights -> its logits."""
        raise NotImplementedError(f"{self.name} adapts one segment at a time")

    def precision(self, side_by_side: bool = False) -> str:
        """What the path taken computes in, for the results file."""
        if self.amp and self.device.type == "cuda":
            return "bf16 autocast"
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def convolutions(self, side_by_side: bool = False) -> str:
        """Who ran the convolutions: "torch" or "triton where faster"."""
        return "torch"


class OnlineMethod(Method):
    """A registered method whose maths is one online stream: `stream_class(model, task, config, classes, generator)`,
    an OnlineExecution (engine/online.py). Its Settings have `steps` (the shared --steps overrides it). Independent
    segments go to a parallel twin (engine/parallel_online.py) when the config has no per-sample policy."""

    takes_sequences = True
    moves_params = True
    stream_class: ClassVar[type]

    def __init__(self, model, task, settings, common, classes, device):
        check_confidence(task, common.skip_above)
        super().__init__(model, task, settings, common, classes, device)
        execution = resolve(common, device)
        steps = settings.steps if common.steps is None else common.steps
        config = online_config(common, execution, steps, batch=common.batch, skip_above=common.skip_above)
        self.amp = config.amp
        generator = online_generator(common, execution)
        self.parallel = None  # on its own copy of the model, which keeps torch's kernels (vmap needs them)
        if execution.streams > 1 and supports_parallel(config):
            parallel_config = replace(config, amp=execution.amp("parallel"))
            self.parallel = ParallelOnlineTTT(copy.deepcopy(model), task, parallel_config, generator, execution.streams)
        self.online = self.stream_class(model, task, config, classes, generator)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        return self.online.adapt(images)

    def adapt_sequence(self, images: torch.Tensor) -> torch.Tensor:
        return self.online.adapt_sequence(images)

    def reset(self) -> None:
        self.online.reset()

    def counters(self) -> dict[str, int]:
        values = self.online.counters()
        for name, value in (self.parallel.counters() if self.parallel is not None else {}).items():
            values[name] += value
        return values

    def batch_size(self, sample: torch.Tensor) -> int:
        return self.common.batch

    def side_by_side(self, segments: int) -> bool:
        return self.parallel is not None and segments > 1

    def adapt_streams(self, images, streams, on_step):
        return self.parallel.adapt_streams(images, streams, on_step)

    def precision(self, side_by_side: bool = False) -> str:
        self.amp = (self.parallel if side_by_side else self.online).config.amp
        return super().precision()

    def convolutions(self, side_by_side: bool = False) -> str:
        return (self.parallel if side_by_side else self.online).convolutions()
