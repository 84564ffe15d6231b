"""GroupNorm + ReLU as one Triton kernel each way (the kernels are in norm_kernels.py), for the pre-activation
ResNet's norm-ReLU pairs.

Why: torch.compile turns each GroupNorm + ReLU of the stream step into a statistics kernel and a normalising kernel,
and its backward into three or four more: about half of a stream frame's kernels, each tiny, on a GPU the step
leaves mostly idle (docs/speed-notes.md). One program per (image, group) holds the whole group in
registers (the ResNet-26's groups are 512-2,048 values), so the statistics, the normalisation and the ReLU are one
kernel, and the backward pass (through the ReLU, the normalisation, and into the weight and bias) one more.

`group_norm_relu` is a torch custom op with its own backward, opaque to torch.compile and captured by CUDA graphs.
Where Triton cannot run it (no triton, a CPU without TRITON_INTERPRET=1, groups of more than MAX_GROUP values)
it runs torch's group norm and ReLU instead: the slow twin the tests compare it with.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tta_cli.kernels import zeroed_outputs
from tta_cli.kernels.norm_kernels import triton
from tta_cli.kernels.triton_conv import INTERPRET, _accumulator, available

if triton is not None:
    from tta_cli.kernels.norm_kernels import group_norm_relu_backward_kernel, group_norm_relu_kernel

MAX_GROUP = 16384  # values per (image, group) one program holds in registers; larger groups run torch's kernels


def _statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the kernels keep their sums (as triton_conv's accumulators): float64 for float64, else float32."""
    return torch.promote_types(dtype, torch.float32)


def _pixels(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _uses_kernel(x: torch.Tensor, groups: int) -> bool:
    return available(x.device) and x.shape[0] > 0 and x.shape[1] // groups * _pixels(x) <= MAX_GROUP


def _tiling(x: torch.Tensor, groups: int) -> dict:
    per_group, pixels = x.shape[1] // groups, _pixels(x)
    block_c, block_hw = triton.next_power_of_2(per_group), triton.next_power_of_2(pixels)
    size = block_c * block_hw
    warps = 1 if INTERPRET else 2 if size <= 512 else 4 if size <= 2048 else 8
    return {"CPG": per_group, "BC": block_c, "BHW": block_hw, "ACC": _accumulator(x.dtype), "num_warps": warps}


@torch.library.custom_op("tta::group_norm_relu", mutates_args=())
def group_norm_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relu(group_norm(x)), mean, rstd): x (N, C, H, W), the statistics (N * groups,) in float32 (float64 for
    float64 x), kept for the backward pass."""
    x = x.contiguous()
    batch, channels = x.shape[:2]
    if not _uses_kernel(x, groups):  # torch's kernels, in the statistics' precision (bf16 x, fp32 weight: autocast)
        dtype = _statistics_dtype(x.dtype)
        out, mean, rstd = torch.ops.aten.native_group_norm(
            x.to(dtype), weight.to(dtype), bias.to(dtype), batch, channels, _pixels(x), groups, eps
        )
        return torch.relu(out).to(x.dtype), mean.reshape(-1), rstd.reshape(-1)
    y = torch.empty_like(x)
    mean = torch.empty(batch * groups, device=x.device, dtype=_statistics_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    group_norm_relu_kernel[(batch * groups,)](x, weight, bias, y, mean, rstd, channels, _pixels(x), eps, **_tiling(x, groups))
    return y, mean, rstd


@group_norm_relu.register_fake
def _(x, weight, bias, groups, eps):
    statistics = x.new_empty(x.shape[0] * groups, dtype=_statistics_dtype(x.dtype))
    return x.new_empty(x.shape), statistics, statistics.clone()


@torch.library.custom_op("tta::group_norm_relu_backward", mutates_args=())
def group_norm_relu_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    groups: int, weight_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, d_weight_and_bias): the gradient of x and, with weight_grads, those of the weight and bias stacked as
    (2, C) (one zeroed output the kernel adds into: a custom op's outputs may not share storage), else an empty
    (0,) tensor."""
    dy, x = dy.contiguous(), x.contiguous()
    batch, channels = x.shape[:2]
    if not _uses_kernel(x, groups):
        return _torch_backward(dy, x, weight, bias, mean, rstd, groups, weight_grads)
    dx = torch.empty_like(x)
    atomic = not torch.are_deterministic_algorithms_enabled()
    dtype = _statistics_dtype(x.dtype)
    if not weight_grads:
        sums = torch.empty(0, device=x.device, dtype=dtype)
    elif atomic:  # added into by every image's programs
        sums = zeroed_outputs.zeros("dw", (2, channels), x.device, dtype)
    else:  # each image's part, summed after: deterministic
        sums = torch.empty(2, batch, channels, device=x.device, dtype=dtype)
    first, second = (sums[0], sums[1]) if weight_grads else (sums, sums)
    group_norm_relu_backward_kernel[(batch * groups,)](
        dy, x, weight, bias, mean, rstd, dx, first, second, channels, _pixels(x),
        WEIGHT_GRADS=weight_grads, ATOMIC=atomic, **_tiling(x, groups),
    )
    if weight_grads and not atomic:
        sums = sums.sum(1)
    return dx, sums.to(weight.dtype)


@group_norm_relu_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, groups, weight_grads):
    return x.new_empty(x.shape), weight.new_empty((2, x.shape[1]) if weight_grads else (0,))


def _torch_backward(dy, x, weight, bias, mean, rstd, groups: int, weight_grads: bool):
    """The backward pass by torch's own kernels, in the statistics' precision: the ReLU's mask from the recomputed
    pre-activation, then native_group_norm_backward."""
    batch, channels = x.shape[:2]
    x_dtype, weight_dtype, dtype = x.dtype, weight.dtype, mean.dtype
    x, dy, weight, bias = x.to(dtype), dy.to(dtype), weight.to(dtype), bias.to(dtype)
    normed = ((x.reshape(batch, groups, -1) - mean.view(batch, groups, 1)) * rstd.view(batch, groups, 1)).view_as(x)
    pre = normed * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    grad = torch.where(pre > 0, dy, torch.zeros_like(dy))
    dx, dweight, dbias = torch.ops.aten.native_group_norm_backward(
        grad, x, mean.view(batch, groups), rstd.view(batch, groups), weight, batch, channels, _pixels(x), groups,
        [True, weight_grads, weight_grads],
    )
    sums = torch.stack([dweight, dbias]) if weight_grads else weight.new_empty(0)
    return dx.to(x_dtype), sums.to(weight_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.groups = groups


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    weight_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx, sums = group_norm_relu_backward(dy, x, weight, bias, mean, rstd, ctx.groups, weight_grads)
    dweight = sums[0] if weight_grads and ctx.needs_input_grad[1] else None
    dbias = sums[1] if weight_grads and ctx.needs_input_grad[2] else None
    return dx if ctx.needs_input_grad[0] else None, dweight, dbias, None, None


group_norm_relu.register_autograd(_backward, setup_context=_setup_context)


class TritonGroupNorm(nn.GroupNorm):
    """An nn.GroupNorm (same parameters, same state dict) that also offers `forward_relu`: relu(norm(x)) as one
    group_norm_relu call, which preact_resnet.norm_relu uses where it finds it."""

    def forward_relu(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_relu(x, self.weight, self.bias, self.num_groups, self.eps)[0]


def supported(norm: nn.Module) -> bool:
    return type(norm) is nn.GroupNorm and norm.affine


def use_triton_norms(module: nn.Module) -> int:
    """Swap every affine nn.GroupNorm under `module` for a TritonGroupNorm sharing its parameters (in place);
    returns how many were swapped."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if supported(child):
                replacement = TritonGroupNorm.__new__(TritonGroupNorm)
                replacement.__dict__.update(child.__dict__)
                setattr(parent, name, replacement)
                swapped += 1
    return swapped
