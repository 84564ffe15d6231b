"""SAR (Niu et al. 2023): sharpness-aware, reliable entropy minimisation on the normalization affine parameters below
the deepest stage, with recovery of the source weights when the entropy collapses."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.batch import ReliableEntropy, norm_affine_names, softmax_entropy


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
    names = norm_affine_names(model)
    deepest = "layer4" if any(".layer4." in name for name in names) else "layer3"
    blocks = {int(match.group(1)) for name in names if (match := re.search(r"\.blocks\.(\d+)\.", name))}
    first_skipped_block = len(blocks) - len(blocks) // 4

    def skipped(name: str) -> bool:
        block = re.search(r"\.blocks\.(\d+)\.", name)
        return (f".{deepest}." in name or ".final." in name or re.fullmatch(r"main_head\.\d+\.norm\.\w+", name) is not None
                or (block is not None and int(block.group(1)) >= first_skipped_block))

    return [name for name in names if not skipped(name)]


@register
class SAR(ReliableEntropy):
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
    limits = {**ReliableEntropy.limits, "rho": (0, None), "reset_constant": (0, None), "ema": (0, 1)}

    def __init__(self, model, task, settings, common, classes, device):
        super().__init__(model, task, settings, common, classes, device)
        self.loss_average = None  # moving average of the second loss (None: no reliable batch since the last reset)
        self.recoveries = 0

    def trained(self, model):
        names = set(sar_parameter_names(model))
        return [param for name, param in model.named_parameters() if name in names]

    def learning_rate(self) -> float:
        return self.settings.lr * min(self.settings.batch, 32) / 32

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        entropy, reliable = self.reliable_entropy(logits)
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
        super().reset()
        self.loss_average = None

    def counters(self) -> dict[str, int]:
        return {"reliable_samples": self.reliable, "recoveries": self.recoveries}

