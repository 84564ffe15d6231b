"""TTTModel: shared encoder + main head (classifier) + self-supervised head, with its normalization."""

from __future__ import annotations

import torch
from torch import nn


class TTTModel(nn.Module):
    """Y-shaped network. Inputs are float images in [0, 1], (B, 3, H, W); the model normalizes them
    itself (mean/std are buffers saved in the checkpoint), so callers never need the statistics."""

    def __init__(self, encoder: nn.Module, main_head: nn.Module, ssl_head: nn.Module, mean, std):
        super().__init__()
        self.encoder = encoder
        self.main_head = main_head
        self.ssl_head = ssl_head
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(images))

    def forward(self, images: torch.Tensor, head: str = "main") -> torch.Tensor:
        """Main-head class logits, or the ssl head's outputs with `head="ssl"` (one entry point,
        so `torch.func.functional_call` reaches either head)."""
        features = self.features(images)
        return self.ssl_head(features) if head == "ssl" else self.main_head(features)

    def ssl(self, images: torch.Tensor) -> torch.Tensor:
        """Self-supervised head outputs (rotation logits or reconstructed pixels)."""
        return self.ssl_head(self.features(images))

    def both(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Main logits and ssl outputs from one encoder pass."""
        features = self.features(images)
        return self.main_head(features), self.ssl_head(features)
