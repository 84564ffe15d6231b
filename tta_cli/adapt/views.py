"""Test-time augmentation: a prediction averaged over K views of each sample. View 0 is the sample itself, views
1..K-1 the training augmentation (random crop of the image padded by 4 pixels with the checkpoint's pad mode, then a
random flip), so K = 1 is the plain prediction. Used by `ttaug` (the source model) and by `--views K` (any episodic
method: each view adapted and predicted as a sample of its own)."""

from __future__ import annotations

import math

import torch

from tta_cli.adapt.methods.base import Method
from tta_cli.data.augment import random_crop_flip
from tta_cli.errors import TTAError


def prediction_views(images: torch.Tensor, views: int, pad_mode: str, generator: torch.Generator | None, augment: bool = True) -> torch.Tensor:
    """(B, C, H, W) -> (B * views, C, H, W), grouped per image: row i * views is image i itself, the rest its
    crop+flip views (copies of it without `augment`)."""
    repeated = images.repeat_interleave(views, dim=0)
    if not augment or views == 1:
        return repeated
    augmented = random_crop_flip(repeated, padding=4, generator=generator, pad_mode=pad_mode)
    augmented[:: views] = images
    return augmented


def mean_softmax(logits: torch.Tensor, views: int) -> torch.Tensor:
    """(B * views, classes) grouped per image -> (B, classes): the log of the mean softmax over each image's views,
    computed in log space so that a confident view never turns into -inf."""
    log_probabilities = logits.log_softmax(1).view(-1, views, logits.shape[1])
    return log_probabilities.logsumexp(1) - math.log(views)


class ViewAveraged(Method):
    """`--views K` around an episodic method: every sample's K views go to the method as K samples of their own (each
    adapted alone, as the method treats any sample), and the sample's prediction is their mean softmax."""

    def __init__(self, inner: Method, views: int):
        if not inner.episodic:
            raise TTAError(
                f"--views averages the predictions of episodic methods; {inner.name} adapts online, where each view would "
                "be one more update of the stream (use ttaug, or an episodic method: ttt, ttt-nn, memo, source)"
            )
        super().__init__(inner.model, inner.task, inner.settings, inner.common, inner.classes, inner.device)
        self.inner, self.views = inner, views
        self.name, self.episodic, self.updates = inner.name, True, inner.updates
        self.semantics = f"{inner.semantics} Each prediction is the mean softmax over {views} views (the sample, then crop+flip)."
        self.generator = torch.Generator(device=inner.device).manual_seed(inner.common.seed + 1)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        views = prediction_views(images, self.views, self.task.view_pad_mode, self.generator)
        return mean_softmax(self.inner.adapt(views), self.views)

    def reset(self) -> None:
        self.inner.reset()

    def counters(self) -> dict[str, int]:
        return self.inner.counters()

    def batch_size(self, sample: torch.Tensor) -> int:
        return max(1, self.inner.batch_size(sample) // self.views)

    def adapt_shard(self, images, batch_number, rank, world_size):
        raise TTAError("--views runs as one process: a sample's views could land on different torchrun processes")

    def precision(self, side_by_side: bool = False) -> str:
        return self.inner.precision(side_by_side)

    def convolutions(self, side_by_side: bool = False) -> str:
        return self.inner.convolutions(side_by_side)
