"""Low-rank adapters on the encoder's convolutions (`--params adapters`): conv(x) + up(down(x)).

`down` is a fixed random convolution to `rank` channels with the conv's kernel, stride and padding; `up` a 1x1
convolution back, zero-initialised and the only weight test-time training moves (the frozen-A form of LoRA,
"LoRA-FA"). So a fresh adapter adds exactly zero, reset is a zero-fill of `up`, and the per-sample weights of episodic
TTT are `rank * out_channels` numbers per convolution instead of the whole filter bank. up(down(x)) is itself a
convolution with weight up @ down, so an adapted model folds back into plain convolutions (`merged_state`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_SEED = 0  # the fixed down-projections are drawn from this seed: the same adapters for every run


class AdaptedConv2d(nn.Module):
    """`conv` (frozen at test time) plus a low-rank branch: (B, in, H, W) -> (B, out, H', W')."""

    def __init__(self, conv: nn.Conv2d, rank: int, generator: torch.Generator):
        super().__init__()
        self.conv = conv
        fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        down = torch.randn(rank, conv.in_channels // conv.groups, *conv.kernel_size, generator=generator) / fan_in**0.5
        self.register_buffer("down", down.to(conv.weight), persistent=False)  # (rank, in, k, k): fixed
        self.up = nn.Parameter(torch.zeros(conv.out_channels, rank, 1, 1, dtype=conv.weight.dtype, device=conv.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        low_rank = F.conv2d(x, self.down.to(x.dtype), None, conv.stride, conv.padding, conv.dilation)  # (B, rank, H', W')
        return conv(x) + F.conv2d(low_rank, self.up.to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        """The one convolution's weight equal to conv + up(down(.)): W + up @ down."""
        delta = torch.einsum("or,rikl->oikl", self.up[:, :, 0, 0], self.down)
        return self.conv.weight + delta


def add_adapters(model: nn.Module, rank: int) -> int:
    """Wrap every plain (ungrouped) convolution of `model.encoder` in an AdaptedConv2d, in place; returns how many."""
    generator = torch.Generator().manual_seed(ADAPTER_SEED)
    added = 0
    for parent in list(model.encoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and child.groups == 1:
                setattr(parent, name, AdaptedConv2d(child, rank, generator))
                added += 1
    return added


def adapter_parameter_names(model: nn.Module) -> list[str]:
    return [f"encoder.{name}" for name, _ in model.encoder.named_parameters() if name.endswith(".up")]


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` under the names of the model without adapters, each adapter folded into its convolution."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, AdaptedConv2d):
            state.pop(f"{name}.up")
            state.pop(f"{name}.conv.weight")
            state[f"{name}.weight"] = module.merged_weight().detach()
            if module.conv.bias is not None:
                state[f"{name}.bias"] = state.pop(f"{name}.conv.bias")
    return state
