"""MEMO (Zhang, Levine, Finn 2022): each test image alone: SGD on the entropy of the marginal prediction (the mean
softmax) over `copies` AugMix views of it, then predict the un-augmented image and restore the weights.

Batching: `adapt` loops over the samples of a batch, one episode each (views of one image form one batch through the
network); the weights are restored after every sample, so a sample's result does not depend on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.batch import BatchMethod
from tta_cli.data.augmix import augmix


@dataclass
class MemoSettings:
    lr: float = 0.005  # SGD learning rate (authors' CIFAR-10 code)
    steps: int = 1  # SGD steps per image (their --niter); the shared --steps overrides it
    copies: int = 32  # AugMix views per step (their --batch_size)
    momentum: float = 0.0  # SGD momentum (their CIFAR optimizer is plain SGD)
    weight_decay: float = 0.0  # SGD weight decay (none in their CIFAR optimizer)
    prior_strength: float = 16.0  # BatchNorm models only: N, test statistics weigh 1/(N+1) against the running ones


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean softmax of (copies, classes) logits, computed in log space."""
    log_marginal = logits.log_softmax(1).logsumexp(0) - math.log(logits.shape[0])
    log_marginal = log_marginal.clamp_min(torch.finfo(log_marginal.dtype).min)
    return -(log_marginal.exp() * log_marginal).sum()


class PriorBatchNorm(nn.Module):
    """MEMO's single-point BatchNorm: normalise with prior * running statistics + (1 - prior) * the input's own
    (mean and unbiased variance over batch and pixels, held constant for the gradient, as in the authors' code)."""

    def __init__(self, norm: nn.BatchNorm2d, prior: float):
        super().__init__()
        self.norm = norm
        self.prior = prior

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.detach().mean((0, 2, 3))
        var = x.detach().var((0, 2, 3))
        mean = self.prior * self.norm.running_mean + (1 - self.prior) * mean
        var = self.prior * self.norm.running_var + (1 - self.prior) * var
        return F.batch_norm(x, mean, var, self.norm.weight, self.norm.bias, False, 0.0, self.norm.eps)


def use_prior_batchnorm(model: nn.Module, prior_strength: float) -> None:
    prior = prior_strength / (prior_strength + 1)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name, PriorBatchNorm(child, prior))


@register
class Memo(BatchMethod):
    name = "memo"
    episodic = True
    semantics = (
        "MEMO, marginal entropy over AugMix views of each test image alone. Per image: `steps` SGD steps on the "
        "entropy of the mean softmax over `copies` AugMix views (crop + flip, then a mix of three chains of 1-3 PIL-style "
        "operations, drawn on the device), predict the un-augmented image, restore the weights. BatchNorm models "
        "normalise with running statistics mixed with the input's own, weight N/(N+1) on the running ones (N = "
        "prior_strength). Nothing carries over."
    )
    updates = "every parameter of encoder + main head, per sample (restored after)"
    default_batch = 32
    Settings = MemoSettings
    limits = {
        "lr": (0, None), "steps": (0, None), "copies": (1, None), "momentum": (0, 1), "weight_decay": (0, None),
        "prior_strength": (0, None),
    }

    def __init__(self, model, task, settings, common, classes, device):
        super().__init__(model, task, settings, common, classes, device)
        use_prior_batchnorm(model, settings.prior_strength)
        model.eval()
        self.steps = settings.steps if common.steps is None else common.steps
        self.train_only([*model.encoder.parameters(), *model.main_head.parameters()])
        self.generator = torch.Generator(device=device).manual_seed(common.seed)

    def batch_size(self, sample) -> int:
        return self.default_batch  # images per call, each its own episode

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.adapt_one(image) for image in images])

    def adapt_one(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) -> (1, classes): adapt on views of this image, predict it, restore the source weights."""
        optimizer = torch.optim.SGD(self.params, lr=self.settings.lr, momentum=self.settings.momentum,
                                    weight_decay=self.settings.weight_decay)
        for _ in range(self.steps):
            views = augmix(image.expand(self.settings.copies, -1, -1, -1), self.generator)
            loss = marginal_entropy(self.model(views))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = self.model(image[None])
        self.reset()
        return logits
