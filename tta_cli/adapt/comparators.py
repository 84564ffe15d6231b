"""Comparators run in the same harness as TTT: no adaptation, BatchNorm re-estimation, and Tent."""

from __future__ import annotations

import torch
from torch import nn

from tta_cli.adapt.params import has_batchnorm, norm_parameter_names
from tta_cli.adapt.views import autocast_bf16, full_precision
from tta_cli.errors import TTAError


class SourceModel:
    """No adaptation: the trained model as it is."""

    name = "source"
    episodic = True

    def __init__(self, model: nn.Module, amp: bool = True):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.amp = amp  # bf16 on CUDA only (autocast_bf16)

    def reset(self) -> None:
        """Nothing changes, nothing to reset."""

    def counters(self) -> dict:
        return {}

    @torch.no_grad()
    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        with autocast_bf16(self.device, self.amp):
            return full_precision(self.model(images))


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


class NormAdapt(SourceModel):
    """Test-time BatchNorm (Schneider et al. 2020; Tent's `norm` baseline): batch statistics per test batch."""

    name = "norm"

    def __init__(self, model: nn.Module, amp: bool = True):
        super().__init__(model, amp)
        use_batch_statistics(model)


class Tent:
    """Tent (Wang et al. 2021): minimise prediction entropy on the test batch, updating only the
    normalization affine parameters of the classifier (encoder + main head), Adam lr 1e-3, one step
    per batch, BatchNorm with batch statistics. Returns the predictions made before the update, as Tent does."""

    name = "tent"
    episodic = False

    def __init__(self, model: nn.Module, lr: float = 1e-3, amp: bool = True):
        use_batch_statistics(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.amp = amp  # bf16 on CUDA only (autocast_bf16)
        names = set(norm_parameter_names(model.encoder, "encoder.") + norm_parameter_names(model.main_head, "main_head."))
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        self.params = [p for n, p in model.named_parameters() if n in names]
        self.source = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.optimizer_state = self.optimizer.state_dict()

    def reset(self) -> None:
        with torch.no_grad():
            for param, value in zip(self.params, self.source, strict=True):
                param.copy_(value)
        self.optimizer.load_state_dict(self.optimizer_state)

    def counters(self) -> dict:
        return {}

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        with autocast_bf16(self.device, self.amp):
            logits = full_precision(self.model(images))
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        entropy.backward()
        self.optimizer.step()
        return logits.detach()
