"""Online TTT over several independent streams at once: one set of weights per stream, carried over.

Between two resets the samples of a stream are adapted in order, each update starting from the weights the
last one left. Streams that start from the source weights with no shared state (the per-corruption order's
segments) do not depend on each other, so step t of every stream can run together: S streams give S samples
per batched step, each on its own weights (`PerSampleModel`, or its grouped fold: `per_sample`), with exactly the updates each stream would get
alone. Only the plain update goes this way (any --steps, --lr, --copies, --momentum, --params, --skip-above);
reset every:N/on-shift, rollback, pre-update predictions, mini-batches and window views take the one-stream
path (`OnlineTTT`), whose policies decide per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from tta_cli.data.imageset import to_float_nchw
from tta_cli.engine import grouped
from tta_cli.engine.graphs import CapturedCall
from tta_cli.kernels import triton_conv
from tta_cli.models.params import adapted_parameter_names


def supports_parallel(config) -> bool:
    """Whether an OnlineConfig's stream of updates can run as independent parallel streams."""
    return (
        config.reset.kind == "never"
        and not config.rollback.enabled
        and not config.pre_update
        and config.batch == 1
        and config.forget is None
    )


class ParallelOnlineTTT:
    """`adapt_streams(images, streams)`: online TTT on each index stream into `images`, all streams in lockstep."""

    def __init__(self, model: nn.Module, task, config, generator: torch.Generator | None = None, max_streams: int = 256):
        self.model = model.eval()
        self.task = task
        self.config = config
        self.generator = generator
        self.max_streams = max_streams
        self.device = next(model.parameters()).device
        self.functions = grouped.per_sample_model(model, task, adapted_parameter_names(model, config.params), config)
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        self.counts = {"updates": zero.clone(), "skipped": zero.clone()}

    def adapt_streams(
        self, images: torch.Tensor, streams: list[torch.Tensor], on_step: Callable[[int], None] = lambda done: None
    ) -> list[torch.Tensor]:
        """images uint8 (N, H, W, 3) on the device; streams: index tensors into it, each adapted from the source
        weights in its own order. Returns each stream's logits (len(stream), classes), predicted after its update."""
        outputs: list[torch.Tensor] = []
        done = 0
        for start in range(0, len(streams), self.max_streams):
            group = streams[start : start + self.max_streams]
            outputs += self._adapt_group(images, group, lambda count, base=done: on_step(base + count))
            done += sum(len(s) for s in group)
        return outputs

    def _adapt_group(self, images: torch.Tensor, streams: list[torch.Tensor], on_step: Callable[[int], None]) -> list[torch.Tensor]:
        config, functions = self.config, self.functions
        lengths = [len(stream) for stream in streams]
        count, longest, shortest = len(streams), max(lengths), min(lengths)
        index = torch.stack([torch.cat([s, s[-1:].expand(longest - len(s))]) for s in streams]).to(images.device)  # (S, T)
        active = torch.arange(longest, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]  # (S, T)
        params = functions.repeated_source(count)
        velocity = [torch.zeros_like(p) for p in params] if config.momentum else None
        logits = None
        done = 0
        graph = None
        for position in range(longest):
            current = to_float_nchw(images[index[:, position]]).to(params[0].dtype)  # (S, C, H, W)
            everyone = position < shortest  # every stream still has samples: no gates
            if everyone and self._graphable():  # one captured step per position
                if graph is None:  # the step changes weights, velocity and counters in place
                    step = partial(self._step, params, velocity, active=None)
                    graph = CapturedCall(step, [current], [*params, *(velocity or []), *self.counts.values()])
                step_logits = graph(current)
            else:
                step_logits = self._step(params, velocity, current, None if everyone else active[:, position])
            logits = step_logits.new_empty(count, longest, step_logits.shape[1]) if logits is None else logits
            logits[:, position] = step_logits  # (S, classes), predicted after the update
            done += count if everyone else sum(1 for length in lengths if position < length)
            if position % 64 == 63 or position == longest - 1:
                on_step(done)
        return [logits[row, :length] for row, length in enumerate(lengths)]

    def counters(self) -> dict:
        return {name: int(value) for name, value in self.counts.items()}

    def convolutions(self) -> str:
        return triton_conv.kernels_in(self.model)

    # ---- one position's step (captured as a CUDA graph when every stream is active) ---------
    def _graphable(self) -> bool:
        """A graph needs CUDA, the default generator (graph-safe) and a gate-free update."""
        return self.config.cuda_graph and self.device.type == "cuda" and self.generator is None and self.config.skip_above is None

    def _step(self, params, velocity, current: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """`steps` updates of every stream on its views of `current`, then its logits. Streams where `active`
        (S,) is false (ended) or whose rotation head is confident past --skip-above leave weights and velocity
        as they are; active None means every stream updates (the body a CUDA graph captures)."""
        skipped = self.functions.sgd_steps(params, velocity, current, self.config, self.generator, active).sum()
        live = current.shape[0] if active is None else active.sum()
        self.counts["skipped"] += skipped
        self.counts["updates"] += self.config.steps * live - skipped
        return self.functions.predict(params, current)
