"""Test-time augmentation averaging: the source model's main-head softmax averaged over K views of each sample (the
sample itself, then K-1 crop+flip views: adapt/views.py). No weight changes; the cheap baseline every TTT result
should be shown beside. `--views K` sets K (as it does for every episodic method)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.views import mean_softmax, prediction_views
from tta_cli.config import check_range
from tta_cli.engine.execution import resolve
from tta_cli.engine.precision import autocast_bf16, full_precision


@dataclass
class TTAugSettings:
    views: int = 8  # K, the sample itself among them; --views K sets it too
    augment: bool = True  # false: the K views are copies of the sample (equals source: a check)


@register
class TTAug(Method):
    name = "ttaug"
    episodic = True
    semantics = (
        "Test-time augmentation, the source model's softmax averaged over views. Per sample: the mean main-head "
        "softmax over `views` views (the sample, then crop+flip with the training padding); no weights change."
    )
    updates = "nothing"
    Settings = TTAugSettings

    def __init__(self, model, task, settings, common, classes, device):
        super().__init__(model.eval(), task, settings, common, classes, device)
        self.views = common.views if getattr(common, "views", 1) > 1 else settings.views
        check_range("ttaug.views", self.views, 1)
        self.amp = resolve(common, device).amp("plain")
        self.generator = torch.Generator(device=device).manual_seed(common.seed)

    def batch_size(self, sample: torch.Tensor) -> int:
        return max(1, 1000 // self.views)

    @torch.no_grad()
    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        views = prediction_views(images, self.views, self.task.view_pad_mode, self.generator, self.settings.augment)
        with autocast_bf16(self.device, self.amp):
            logits = full_precision(self.model(views))
        return mean_softmax(logits, self.views)
