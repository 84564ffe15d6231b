"""Tent (Wang et al. 2021): minimise the entropy of the predictions on each test batch by Adam steps on the
normalization layers' affine parameters, BatchNorm normalising with the batch's own statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.methods.norm import use_batch_statistics
from tta_cli.config import check_range
from tta_cli.engine.execution import resolve
from tta_cli.engine.precision import autocast_bf16, full_precision
from tta_cli.models.params import norm_parameter_names


@dataclass
class TentSettings:
    lr: float = 1e-3  # Adam learning rate (the paper's)
    batch: int = 200  # test samples per batch and update


@register
class Tent(Method):
    name = "tent"
    semantics = (
        "Tent, entropy minimisation on each test batch. Adam steps on the normalization affine parameters, one per "
        "batch, predictions before the update; weights carried across the stream, reset at each segment."
    )
    updates = "BatchNorm/GroupNorm/LayerNorm affine parameters of encoder + main head"
    default_batch = 200
    Settings = TentSettings

    def __init__(self, model, task, settings, common, classes, device):
        check_range("tent.lr", settings.lr, 0)
        check_range("tent.batch", settings.batch, 1)
        use_batch_statistics(model)
        super().__init__(model, task, settings, common, classes, device)
        self.amp = resolve(common, device).amp("plain")
        names = set(norm_parameter_names(model.encoder, "encoder.") + norm_parameter_names(model.main_head, "main_head."))
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        self.params = [p for n, p in model.named_parameters() if n in names]
        self.source = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.Adam(self.params, lr=settings.lr, betas=(0.9, 0.999))
        self.optimizer_state = self.optimizer.state_dict()

    def batch_size(self, sample) -> int:
        return self.settings.batch

    def reset(self) -> None:
        with torch.no_grad():
            for param, value in zip(self.params, self.source, strict=True):
                param.copy_(value)
        self.optimizer.load_state_dict(self.optimizer_state)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        with autocast_bf16(self.device, self.amp):
            logits = full_precision(self.model(images))
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        entropy.backward()
        self.optimizer.step()
        return logits.detach()
