"""Adapted parameters as views of one contiguous buffer, so an update, a snapshot, a rollback or a reset is one
kernel each."""

from __future__ import annotations

import torch
from torch import nn


class FlatParameters:
    """Re-point the parameters `names` of `model` at consecutive slices of `flat` (shared storage)."""

    def __init__(self, model: nn.Module, names: list[str]):
        named = dict(model.named_parameters())
        self.params = [named[name] for name in names]
        self.flat = torch.cat([param.detach().reshape(-1) for param in self.params]).clone()
        offset = 0
        for param in self.params:
            param.data = self.flat[offset : offset + param.numel()].view_as(param)
            offset += param.numel()
