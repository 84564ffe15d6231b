"""What the batch-update methods (tent, eata, sar, cotta, memo) share: the parameters that train and their source
values, the optimizer and its fresh state, reset() back to both; and the entropy of the predictions that tent, eata
and sar minimise, eata and sar on the reliable samples only."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.methods.norm import batch_statistics_if_any
from tta_cli.config import check_range
from tta_cli.models.params import norm_parameter_names


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, classes) logits -> (B,) entropy of each sample's softmax."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class BatchMethod(Method):
    """A method that moves `params` (chosen with `train_only`) by `optimizer` on each test batch of `settings.batch`
    samples. `limits` bounds its settings ({field: (low, high)}, check_range's [low, high); high None: no upper end)."""

    limits: ClassVar[dict[str, tuple[float, float | None]]] = {}
    optimizer: torch.optim.Optimizer | None = None  # None: a fresh one per episode (reset() leaves it alone)

    def __init__(self, model, task, settings, common, classes, device):
        for field, (low, high) in self.limits.items():
            check_range(f"{self.name}.{field}", getattr(settings, field), low, high)
        super().__init__(model, task, settings, common, classes, device)

    def train_only(self, params: list[nn.Parameter]) -> None:
        """Freeze the model except `params`, and keep their source values for reset()."""
        self.model.requires_grad_(False)
        self.params = [param.requires_grad_(True) for param in params]
        self.source = [param.detach().clone() for param in self.params]

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.optimizer_state = optimizer.state_dict()

    def batch_size(self, sample) -> int:
        return self.settings.batch

    def reset(self) -> None:
        with torch.no_grad():
            for param, value in zip(self.params, self.source, strict=True):
                param.copy_(value)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self.optimizer_state)


def norm_affine_names(model: nn.Module) -> list[str]:
    """The normalization layers' affine parameters of encoder + main head: what tent, eata and sar move."""
    return norm_parameter_names(model.encoder, "encoder.") + norm_parameter_names(model.main_head, "main_head.")


class ReliableEntropy(BatchMethod):
    """EATA and SAR: momentum SGD on the entropy of the reliable samples, those whose entropy is below
    e_margin ln(classes), moving the parameters `trained(model)` gives; BatchNorm with batch statistics."""

    limits = {"lr": (0, None), "e_margin": (0, None), "batch": (1, None), "momentum": (0, 1)}

    def __init__(self, model, task, settings, common, classes, device):
        super().__init__(model, task, settings, common, classes, device)
        batch_statistics_if_any(model)
        self.train_only(self.trained(model))
        self.margin = settings.e_margin * math.log(classes)
        self.use_optimizer(torch.optim.SGD(self.params, lr=self.learning_rate(), momentum=settings.momentum))
        self.reliable = 0  # reliable samples seen

    def trained(self, model: nn.Module) -> list[nn.Parameter]:
        raise NotImplementedError

    def learning_rate(self) -> float:
        return self.settings.lr

    def reliable_entropy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) entropy of each sample's softmax and (B,) bool: reliable; counts the reliable ones."""
        entropy = softmax_entropy(logits)
        reliable = entropy < self.margin
        self.reliable += int(reliable.sum())
        return entropy, reliable
