"""Test-time BatchNorm (Schneider et al. 2020; Tent's `norm` baseline): normalise with each test batch's statistics."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.source import Source
from tta_cli.config import check_range
from tta_cli.errors import TTAError
from tta_cli.models.params import has_batchnorm


def use_batch_statistics(model: nn.Module) -> None:
    """BatchNorm layers normalise with the current batch's statistics (no running averages)."""
    if not has_batchnorm(model):
        raise TTAError(
            "this model has no BatchNorm layers (GroupNorm normalises per sample already), so `norm` and `tent` "
            "have nothing to re-estimate; train with --set model.norm=bn to compare them"
        )
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None


def batch_statistics_if_any(model: nn.Module) -> None:
    """Eval mode, and use_batch_statistics where the model has BatchNorm layers (GroupNorm and LayerNorm are per sample)."""
    model.eval()
    if has_batchnorm(model):
        use_batch_statistics(model)


@dataclass
class NormSettings:
    batch: int = 200  # test samples per batch, whose statistics normalise it (as in Tent)


@register
class Norm(Source):
    name = "norm"
    episodic = False
    semantics = "BatchNorm with test-batch statistics. Each batch of `batch` samples is normalised with its own mean and variance."
    updates = "BatchNorm statistics only (no parameters)"
    default_batch = 200
    Settings = NormSettings

    def __init__(self, model, task, settings, common, classes, device):
        check_range("norm.batch", settings.batch, 1)
        super().__init__(model, task, settings, common, classes, device)
        use_batch_statistics(model)

    def batch_size(self, sample) -> int:
        return self.settings.batch
