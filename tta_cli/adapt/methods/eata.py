"""EATA (Niu et al. 2022): entropy minimisation on the normalization affine parameters, only on reliable (low-entropy)
and non-redundant samples, re-weighted towards the confident ones, with a Fisher penalty against forgetting.

The authors estimate the Fisher from 2000 clean source samples. A test stream has no source data, so here it comes
from the first `fisher_samples` test samples the method receives: squared gradients, at the source weights, of the
cross-entropy against the source model's own predictions, one batch mean at a time and averaged over batches (as the
authors compute it). Until that many samples have arrived the penalty is off (the paper's ETA); the estimate is a
property of the source model, so reset() keeps it. `--set eata.fisher_samples=0` switches the penalty off.
reset() also keeps the moving average of the kept samples' softmax, as the authors' `reset` (`eata.py:59-63`) does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.batch import ReliableEntropy, norm_affine_names


@dataclass
class EataSettings:
    lr: float = 0.005  # SGD learning rate (the paper's for CIFAR-10)
    batch: int = 64  # test samples per batch and update (the paper's)
    momentum: float = 0.9  # SGD momentum
    e_margin: float = 0.4  # reliable samples: entropy < e_margin * ln(classes)
    d_margin: float = 0.4  # non-redundant samples: |cos(softmax, moving average)| < d_margin (the paper's for CIFAR-10)
    fisher_alpha: float = 1.0  # weight of the Fisher penalty (the paper's for CIFAR-10)
    fisher_samples: int = 2000  # first test samples that estimate the Fisher (the authors' count); 0: no penalty
    average: float = 0.9  # weight of the past in the moving average of the selected samples' softmax


@register
class EATA(ReliableEntropy):
    name = "eata"
    semantics = (
        "EATA, entropy minimisation on reliable, non-redundant samples with a Fisher penalty. Per batch: keep the "
        "samples whose entropy is below e_margin ln C and whose softmax is not similar (|cos| < d_margin) to the moving "
        "average of earlier kept ones, weight each by exp(e_margin ln C - entropy), one SGD step on their mean weighted "
        "entropy + fisher_alpha sum F (theta - theta_source)^2; predictions before the update. The Fisher comes from "
        "the stream's first fisher_samples samples at the source weights (no source data here); BatchNorm with batch "
        "statistics."
    )
    updates = "BatchNorm/GroupNorm/LayerNorm affine parameters of encoder + main head"
    default_batch = 64
    Settings = EataSettings
    limits = {**ReliableEntropy.limits, "d_margin": (0, None), "fisher_alpha": (0, None), "fisher_samples": (0, None), "average": (0, 1)}

    def __init__(self, model, task, settings, common, classes, device):
        super().__init__(model, task, settings, common, classes, device)
        self.names = norm_affine_names(model)
        self.fisher = None  # [F_i], once estimated
        self.fisher_sums, self.fisher_batches, self.fisher_seen = [torch.zeros_like(p) for p in self.params], 0, 0
        self.average_probs = None  # (classes,) moving average of the selected samples' softmax, kept across reset()
        self.updated = 0

    def trained(self, model):
        return [model.get_parameter(name) for name in norm_affine_names(model)]

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        if self.fisher_seen < self.settings.fisher_samples:
            self.estimate_fisher(images)
        logits = self.model(images)
        entropy, reliable = self.reliable_entropy(logits)
        probs = logits.detach().softmax(1)
        selected = reliable
        if self.average_probs is not None:
            similarity = F.cosine_similarity(probs, self.average_probs[None], dim=1)
            selected = reliable & (similarity.abs() < self.settings.d_margin)
        count = int(selected.sum())
        self.updated += count
        if count:
            weights = torch.exp(self.margin - entropy.detach())
            loss = (weights * entropy)[selected].mean() + self.fisher_penalty()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.remember(probs[selected].mean(0))
        return logits.detach()

    def fisher_penalty(self) -> torch.Tensor | float:
        if self.fisher is None or self.settings.fisher_alpha == 0:
            return 0.0
        return self.settings.fisher_alpha * sum(
            (fisher * (param - source) ** 2).sum() for fisher, param, source in zip(self.fisher, self.params, self.source, strict=True)
        )

    def estimate_fisher(self, images: torch.Tensor) -> None:
        """Add this batch's squared gradient of the source model's cross-entropy against its own argmax."""
        images = images[: self.settings.fisher_samples - self.fisher_seen]
        source = {name: value.clone().requires_grad_(True) for name, value in zip(self.names, self.source, strict=True)}
        logits = functional_call(self.model, source, (images,))
        gradients = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), list(source.values()))
        for total, gradient in zip(self.fisher_sums, gradients, strict=True):
            total += gradient**2
        self.fisher_batches += 1
        self.fisher_seen += len(images)
        if self.fisher_seen >= self.settings.fisher_samples:
            self.fisher = [total / self.fisher_batches for total in self.fisher_sums]

    def remember(self, mean_probs: torch.Tensor) -> None:
        past = self.average_probs
        rate = self.settings.average
        self.average_probs = mean_probs if past is None else rate * past + (1 - rate) * mean_probs

    def counters(self) -> dict[str, int]:
        return {"reliable_samples": self.reliable, "updated_samples": self.updated}
