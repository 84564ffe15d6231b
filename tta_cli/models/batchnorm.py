"""BatchNorm whose training statistics come from the clean images alone.

Joint training passes a batch of clean images and its self-supervised views (rotated or masked copies)
through the shared encoder. With plain BatchNorm the views shape the batch statistics that the clean
images are normalised with, and the running averages: the main head then learns features normalised by
the statistics of a clean+rotated mixture, which neither test-batch statistics (`norm`, `tent`) nor the
clean running averages reproduce at test time. Here the statistics come from the first `statistics_rows`
rows (the clean images) and every row, views included, is normalised with them, as at test time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class CleanStatsBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same state dict); in training with `statistics_rows` set, the batch mean and variance
    are those of the first `statistics_rows` rows, the running averages follow them, and all rows are
    normalised with them. Without it (evaluation, test-time `norm`/`tent`) it is plain BatchNorm."""

    statistics_rows: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.statistics_rows
        if not (self.training and rows):
            return super().forward(x)
        clean = x[:rows].to(torch.promote_types(x.dtype, torch.float32))  # (rows, C, H, W), bf16 counted in fp32
        mean = clean.mean(dim=(0, 2, 3))
        var = clean.var(dim=(0, 2, 3), unbiased=False)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), clean[:, 0].numel())
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale + (self.bias if self.affine else 0.0)
        return (x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype))

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """As nn.BatchNorm2d does: exponential (or, with momentum None, cumulative) averages, unbiased variance."""
        self.num_batches_tracked += 1
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def has_clean_stats_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, CleanStatsBatchNorm2d) for module in model.modules())


@contextmanager
def statistics_from_first(model: nn.Module, rows: int | None) -> Iterator[None]:
    """Inside, every CleanStatsBatchNorm2d of `model` takes its training statistics from the first `rows` rows
    (None: from all rows, plain BatchNorm)."""
    layers = [module for module in model.modules() if isinstance(module, CleanStatsBatchNorm2d)]
    for layer in layers:
        layer.statistics_rows = rows
    try:
        yield
    finally:
        for layer in layers:
            layer.statistics_rows = None


class AffineEvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose eval-mode forward is written as one scale and shift per channel from the running
    statistics: the same function as the fused kernel, but torch.func's vmap batches it (it has no batching rule
    for eval-mode batch_norm and falls back to a loop over copies). Same parameter and buffer names, so a
    functional call with per-sample weights sees no difference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_var is None:
            return super().forward(x)
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -self.running_mean * scale + (self.bias if self.affine else 0.0)
        return x * scale[:, None, None] + shift[:, None, None]


def with_affine_eval_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` whose eval-mode BatchNorm2d layers run as AffineEvalBatchNorm2d (for per-sample vmap);
    `model` itself is unchanged. A model without such layers is returned as it is."""
    if not any(isinstance(m, nn.BatchNorm2d) and not m.training for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and not module.training:
            module.__class__ = AffineEvalBatchNorm2d
    return model
