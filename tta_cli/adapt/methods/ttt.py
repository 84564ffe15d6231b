"""Episodic test-time training (Sun et al. 2020): every sample starts from the trained weights, takes `steps` SGD
steps on the self-supervised loss of `copies` augmented views of itself, and is then classified by the main head.

The samples of a chunk are adapted at once on per-sample weights (engine/episodic.py over engine/per_sample.py);
every sample's result is its own, whatever the chunk. With `cache` (tau), a sample close to a recently adapted one
reuses its adapted weights instead (engine/weight_cache.py); results.json counts the hits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.policies import check_confidence
from tta_cli.config import check_range
from tta_cli.engine.episodic import EpisodicConfig, EpisodicTTT
from tta_cli.engine.execution import resolve


@dataclass
class TTTSettings:
    steps: int = 10  # SGD steps per sample (the paper's); the shared --steps overrides it
    cache: float | None = None  # tau: reuse a recent sample's adapted weights at source-embedding cosine >= tau (None: off)
    cache_size: int = 256  # adapted samples the cache keeps, the most recent


@register
class TTT(Method):
    name = "ttt"
    episodic = True
    semantics = (
        "Episodic TTT, each sample adapted alone, then predicted. Per sample: reset to the trained weights, `steps` SGD "
        "steps on the ssl loss of `copies` augmented views (crop with 4-pixel padding + flip, then one random rotation "
        "or mask each), predict after. Nothing carries over, except with `cache` (tau): a sample whose source embedding "
        "has cosine >= tau with a recently adapted sample's reuses its adapted weights."
    )
    updates = "the `params` group (default: the encoder), per sample"
    default_batch = 2048  # under torchrun; one process sizes its batches to its chunks (batch_size)
    moves_params = True
    Settings = TTTSettings

    def __init__(self, model, task, settings, common, classes, device):
        check_confidence(task, common.skip_above)
        check_range("ttt.cache_size", settings.cache_size, 1)
        super().__init__(model, task, settings, common, classes, device)
        execution = resolve(common, device)
        self.amp = execution.amp("episodic")
        config = EpisodicConfig(
            steps=settings.steps if common.steps is None else common.steps,
            lr=common.lr, copies=common.copies, momentum=common.momentum, params=common.params, per_sample=execution.per_sample,
            skip_above=common.skip_above, chunk=execution.chunk, amp=self.amp, compile=execution.compile,
            cache=settings.cache, cache_size=settings.cache_size,
        )
        self.episodes = EpisodicTTT(model, task, config, torch.Generator(device=device).manual_seed(common.seed))

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        return self.episodes.adapt(images)

    def counters(self) -> dict[str, int]:
        return self.episodes.counters()

    def batch_size(self, sample: torch.Tensor) -> int:
        return self.episodes.batch_size(sample)

    def adapt_shard(self, images, batch_number, rank, world_size):
        return self.episodes.adapt_shard(images, rank, world_size)
