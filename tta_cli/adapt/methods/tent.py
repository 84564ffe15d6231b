"""Tent (Wang et al. 2021): minimise the entropy of the predictions on each test batch by Adam steps on the
normalization layers' affine parameters, BatchNorm normalising with the batch's own statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.batch import BatchMethod, norm_affine_names, softmax_entropy
from tta_cli.adapt.methods.norm import use_batch_statistics
from tta_cli.engine.execution import resolve
from tta_cli.engine.precision import autocast_bf16, full_precision


@dataclass
class TentSettings:
    lr: float = 1e-3  # Adam learning rate (the paper's)
    batch: int = 200  # test samples per batch and update


@register
class Tent(BatchMethod):
    name = "tent"
    semantics = (
        "Tent, entropy minimisation on each test batch. Adam steps on the normalization affine parameters, one per "
        "batch, predictions before the update; weights carried across the stream, reset at each segment."
    )
    updates = "BatchNorm/GroupNorm/LayerNorm affine parameters of encoder + main head"
    default_batch = 200
    Settings = TentSettings
    limits = {"lr": (0, None), "batch": (1, None)}

    def __init__(self, model, task, settings, common, classes, device):
        super().__init__(model, task, settings, common, classes, device)
        use_batch_statistics(model)
        self.amp = resolve(common, device).amp("plain")
        names = set(norm_affine_names(model))
        self.train_only([param for name, param in model.named_parameters() if name in names])
        self.use_optimizer(torch.optim.Adam(self.params, lr=settings.lr, betas=(0.9, 0.999)))

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        with autocast_bf16(self.device, self.amp):
            logits = full_precision(self.model(images))
        entropy = softmax_entropy(logits).mean()
        self.optimizer.zero_grad(set_to_none=True)
        entropy.backward()
        self.optimizer.step()
        return logits.detach()
