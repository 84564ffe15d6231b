"""The fused GroupNorm + ReLU op (kernels/triton_norm.py) on its torch path (a CPU without Triton's interpreter),
against torch's own group norm and ReLU; tests/triton_checks.py checks its Triton kernels the same way."""

import pytest
import torch
import torch.nn.functional as F

from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.kernels import triton_norm
from tta_cli.models import build_model
from tta_cli.tasks import build_task

# (batch, channels, height, width, groups): the ResNet's groups, uneven sizes, one pixel
SHAPES = [(2, 16, 8, 8, 8), (3, 12, 5, 7, 3), (1, 4, 1, 1, 2)]


def reference_and_fused(shape, weight_grads: bool, seed: int = 0):
    batch, channels, height, width, groups = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)
    weight = torch.randn(channels, dtype=torch.float64, generator=generator)
    bias = torch.randn(channels, dtype=torch.float64, generator=generator) * 0.5
    dy = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)
    results = []
    for fused in (False, True):
        leaves = [t.clone().requires_grad_(weight_grads or t is x) for t in (x, weight, bias)]
        if fused:
            out = triton_norm.group_norm_relu(leaves[0], leaves[1], leaves[2], groups, 1e-5)[0]
        else:
            out = torch.relu(F.group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5))
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        results.append((out, torch.autograd.grad(out, wanted, dy)))
    return results


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weight_grads", [True, False], ids=["weights", "input-only"])
def test_torch_path_of_the_fused_op_equals_group_norm_then_relu(shape, weight_grads):
    (want, want_grads), (got, got_grads) = reference_and_fused(shape, weight_grads)
    assert torch.allclose(got, want, atol=1e-12)
    assert len(got_grads) == len(want_grads) == (3 if weight_grads else 1)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got_grad, want_grad, atol=1e-10)


def test_torch_path_takes_bf16_inputs_beside_fp32_weights_as_autocast_leaves_them():
    """A convolution's bf16 output and the norm's fp32 parameters (groups too large for one program land here)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 4, 4, generator=generator).bfloat16().requires_grad_()
    weight, bias = torch.randn(8, generator=generator).requires_grad_(), torch.randn(8, generator=generator).requires_grad_()
    out = triton_norm.group_norm_relu(x, weight, bias, 4, 1e-5)[0]
    grads = torch.autograd.grad(out.float().sum(), (x, weight, bias))
    want = torch.relu(F.group_norm(x.float(), 4, weight, bias, 1e-5))
    want_grads = torch.autograd.grad(want.sum(), (x, weight, bias))
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    assert torch.allclose(out.float(), want, atol=2e-2)
    for got, expected in zip(grads, want_grads, strict=True):
        assert torch.allclose(got.float(), expected.float(), atol=5e-2)


def test_swapping_the_norms_keeps_the_state_dict_and_the_outputs():
    task = build_task(TaskConfig(name="rotation"))
    model = build_model(ModelConfig(depth=8, groups=4, img_size=8), task).double().eval()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    before, keys = model(images), list(model.state_dict())
    swapped = triton_norm.use_triton_norms(model)
    assert swapped == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) > 0
    assert all(type(m) is not torch.nn.GroupNorm for m in model.modules())
    assert list(model.state_dict()) == keys
    assert torch.allclose(model(images), before, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(32, 16, 32, 32, 8), (32, 32, 16, 16, 8), (1, 64, 8, 8, 8), (3, 12, 5, 7, 3)], ids=str)
def test_fused_norm_kernels_on_cuda_follow_torch(shape, dtype):
    """The compiled kernels (statistics in fp32 whatever the input) against torch's group norm in fp32."""
    batch, channels, height, width, groups = shape
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, channels, height, width, device="cuda", generator=generator).to(dtype)
    weight = torch.randn(channels, device="cuda", generator=generator)
    bias = torch.randn(channels, device="cuda", generator=generator) * 0.5
    dy = torch.randn(batch, channels, height, width, device="cuda", generator=generator).to(dtype)
    assert triton_norm._uses_kernel(x, groups)
    runs = []
    for fused in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        if fused:
            out = triton_norm.group_norm_relu(*leaves, groups, 1e-5)[0]
        else:
            out = torch.relu(F.group_norm(leaves[0].float(), groups, leaves[1], leaves[2], 1e-5)).to(dtype)
        runs.append((out, *torch.autograd.grad(out, leaves, dy)))
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(runs[1], runs[0], strict=True):
        assert got.dtype == want.dtype
        assert torch.allclose(got.float(), want.float(), atol=tolerance * float(want.abs().max().float()))
