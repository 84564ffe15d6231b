"""SAR (Niu et al. 2023): sharpness-aware, reliable entropy minimisation on the normalization affine parameters below
the deepest stage, with recovery of the source weights when the entropy collapses."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.methods.norm import use_batch_statistics
from tta_cli.config import check_range
from tta_cli.models.params import has_batchnorm, norm_parameter_names


@dataclass
class SarSettings:
    lr: float = 0.00025  # SGD learning rate at batch >= 32; smaller batches scale it by batch / 32 (authors' rule)
    batch: int = 64  # test samples per batch and update (authors' default)
    momentum: float = 0.9  # SGD momentum
    rho: float = 0.05  # SAM neighbourhood radius
    e_margin: float = 0.4  # reliable samples: entropy < e_margin * ln(classes)
    reset_constant: float = 0.2  # recover the source weights when the moving average of the second loss falls below
    ema: float = 0.9  # weight of the past in that moving average


def sar_parameter_names(model) -> list[str]:
    """Norm affine parameters of encoder + main head, except the deepest stage and the final norm, as the authors
    skip ResNet-50's layer4 and ViT-B's blocks 9-11 and `norm`: here the last residual stage (layer4 where the
    backbone has one, else layer3), the pre-activation ResNet's `final` norm, a ViT's last quarter of blocks and its
    final `norm`."""
    names = norm_parameter_names(model.encoder, "encoder.") + norm_parameter_names(model.main_head, "main_head.")
    deepest = "layer4" if any(".layer4." in name for name in names) else "layer3"
    blocks = {int(match.group(1)) for name in names if (match := re.search(r"\.blocks\.(\d+)\.", name))}
    first_skipped_block = len(blocks) - len(blocks) // 4

    def skipped(name: str) -> bool:
        block = re.search(r"\.blocks\.(\d+)\.", name)
        return (f".{deepest}." in name or ".final." in name or re.fullmatch(r"main_head\.\d+\.norm\.\w+", name) is not None
                or (block is not None and int(block.group(1)) >= first_skipped_block))

    return [name for name in names if not skipped(name)]


@register
class SAR(Method):
    name = "sar"
    semantics = (
        "SAR, sharpness-aware reliable entropy minimisation. Per batch: keep the samples whose entropy is below "
        "e_margin ln C, perturb the weights by rho along the normalised gradient of their mean entropy (SAM), and take "
        "one SGD step with the gradient there of the mean entropy of the samples still below the margin; predictions "
        "before the update. When the moving average of that second loss falls below reset_constant the source weights "
        "come back. Normalization affine parameters except the deepest stage; BatchNorm with batch statistics."
    )
    updates = "norm affine parameters of encoder + main head except the deepest stage and the final norm"
    default_batch = 64
    Settings = SarSettings

    def __init__(self, model, task, settings, common, classes, device):
        for field in ("lr", "rho", "e_margin", "reset_constant"):
            check_range(f"sar.{field}", getattr(settings, field), 0)
        check_range("sar.batch", settings.batch, 1)
        check_range("sar.momentum", settings.momentum, 0, 1)
        check_range("sar.ema", settings.ema, 0, 1)
        model.eval()
        if has_batchnorm(model):
            use_batch_statistics(model)
        super().__init__(model, task, settings, common, classes, device)
        names = set(sar_parameter_names(model))
        model.requires_grad_(False)
        self.params = [param for name, param in model.named_parameters() if name in names]
        for param in self.params:
            param.requires_grad_(True)
        self.source = [param.detach().clone() for param in self.params]
        self.margin = settings.e_margin * math.log(classes)
        lr = settings.lr * min(settings.batch, 32) / 32
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=settings.momentum)
        self.optimizer_state = self.optimizer.state_dict()
        self.loss_average = None  # moving average of the second loss (None: no reliable batch since the last reset)
        self.reliable = self.recoveries = 0

    def batch_size(self, sample) -> int:
        return self.settings.batch

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        entropy = softmax_entropy(logits)
        reliable = entropy < self.margin
        self.reliable += int(reliable.sum())
        first_loss = entropy[reliable].sum() / reliable.sum().clamp_min(1)  # (no reliable sample: zero gradients)
        gradients = torch.autograd.grad(first_loss, self.params)
        norm = torch.cat([gradient.flatten() for gradient in gradients]).norm()
        here = [param.detach().clone() for param in self.params]
        with torch.no_grad():  # to the sharpest point within rho
            for param, gradient in zip(self.params, gradients, strict=True):
                param.add_(gradient, alpha=self.settings.rho / float(norm + 1e-12))
        entropy = softmax_entropy(self.model(images))[reliable]
        still_reliable = entropy < self.margin
        second_loss = entropy[still_reliable].sum() / still_reliable.sum().clamp_min(1)
        gradients = torch.autograd.grad(second_loss, self.params)
        with torch.no_grad():  # back, to step from here with the gradient from there
            for param, value in zip(self.params, here, strict=True):
                param.copy_(value)
        for param, gradient in zip(self.params, gradients, strict=True):
            param.grad = gradient
        self.optimizer.step()  # (always, as the authors': with no reliable sample, momentum alone moves)
        if still_reliable.any():
            self.track(float(second_loss.detach()))
        return logits.detach()

    def track(self, second_loss: float) -> None:
        """Model recovery: back to the source when the moving average of the second loss shows a collapse."""
        past = self.loss_average
        self.loss_average = second_loss if past is None else self.settings.ema * past + (1 - self.settings.ema) * second_loss
        if self.loss_average < self.settings.reset_constant:
            self.reset()
            self.recoveries += 1

    def reset(self) -> None:
        with torch.no_grad():
            for param, value in zip(self.params, self.source, strict=True):
                param.copy_(value)
        self.optimizer.load_state_dict(self.optimizer_state)
        self.loss_average = None

    def counters(self) -> dict[str, int]:
        return {"reliable_samples": self.reliable, "recoveries": self.recoveries}


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
