"""No adaptation: the trained model as it is, the baseline every method is compared with."""

from __future__ import annotations

import torch

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.base import Method
from tta_cli.engine.execution import resolve
from tta_cli.engine.precision import autocast_bf16, full_precision


@register
class Source(Method):
    name = "source"
    episodic = True
    semantics = "No adaptation. The trained model predicts every sample as it is."
    updates = "nothing"
    default_batch = 1000

    def __init__(self, model, task, settings, common, classes, device):
        super().__init__(model.eval(), task, settings, common, classes, device)
        self.amp = resolve(common, device).amp("plain")

    @torch.no_grad()
    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        with autocast_bf16(self.device, self.amp):
            return full_precision(self.model(images))
