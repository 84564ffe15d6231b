"""Checks of the Triton convolution kernels on the CPU through Triton's interpreter, in float64 against torch.

Not collected on its own (the name has no test_ prefix): tests/test_triton_conv.py runs this file in a fresh
process with TRITON_INTERPRET=1, which Triton reads when the kernels are defined, so it cannot be set later.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import AtomicEverywhere
from test_triton_norm import SHAPES as NORM_SHAPES
from test_triton_norm import reference_and_fused

from tta_cli.adapt.methods import build_method
from tta_cli.adapt.methods.ttt_online import OnlineTTT
from tta_cli.adapt.online import OnlineConfig
from tta_cli.config import AdaptSettings, ModelConfig, TaskConfig
from tta_cli.engine import compiled
from tta_cli.kernels import triton_conv, triton_norm
from tta_cli.models import build_model
from tta_cli.tasks import build_task

# (batch, in channels, out channels, size, kernel, stride, padding): the ResNet's 3x3 convolutions, strided
# and not, a 1x1 strided one, no padding, odd sizes and channel counts below the 16-wide tiles, stride 3, 7x7
SHAPES = [
    (2, 3, 16, 8, 3, 1, 1),
    (2, 16, 32, 8, 3, 2, 1),
    (3, 5, 7, 9, 3, 2, 1),
    (2, 4, 8, 7, 1, 2, 0),
    (1, 20, 18, 6, 3, 1, 0),
    (2, 8, 4, 5, 3, 3, 1),
    (1, 70, 3, 4, 3, 1, 1),
    (1, 3, 8, 11, 7, 2, 3),  # a ResNet-50 stem
]


def test_the_interpreter_is_on():
    assert triton_conv.INTERPRET and triton_conv.available(torch.device("cpu"))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_equal_torch_convolution_and_its_gradients(shape):
    batch, cin, cout, size, kernel, stride, padding = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(cout, cin, kernel, kernel, dtype=torch.float64, generator=generator, requires_grad=True)
    out = triton_conv.conv2d(x, w, stride, padding)
    expected = F.conv2d(x, w, None, stride, padding)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    dx, dw = torch.autograd.grad(out, (x, w), grad)
    expected_dx, expected_dw = torch.autograd.grad(expected, (x, w), grad)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.allclose(dx, expected_dx, atol=1e-12)
    assert torch.allclose(dw, expected_dw, atol=1e-12)


def test_weight_gradient_sums_every_split_of_the_pixels(monkeypatch):
    """More pixels than one split holds: the partial sums over splits must add up to the whole."""
    monkeypatch.setattr(triton_conv, "WEIGHT_GRAD_PROGRAMS", 3)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 12, 12, dtype=torch.float64, generator=generator)
    dy = torch.randn(3, 16, 12, 12, dtype=torch.float64, generator=generator)
    dw = triton_conv.conv2d_weight_grad(dy, x, [16, 4, 3, 3], 1, 1)
    expected = torch.ops.aten.convolution_backward(
        dy, x, torch.empty(16, 4, 3, 3, dtype=torch.float64), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]
    assert torch.allclose(dw, expected, atol=1e-12)


def test_online_ttt_with_triton_convolutions_equals_torch_convolutions(monkeypatch):
    """Online steps of a tiny ResNet (updates, momentum, predictions) agree in float64, through torch.compile
    (which must keep the custom op as one call; aot_eager traces the backward as inductor would)."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    model = build_model(ModelConfig(depth=8, groups=4, img_size=8), task).to(torch.float64)
    images = torch.rand(2, 1, 3, 8, 8, dtype=torch.float64)
    runs = []
    for kernels in ("torch", "triton"):
        config = OnlineConfig(copies=2, lr=0.05, momentum=0.9, amp=False, conv_kernels=kernels, compile=True)
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(3))
        swapped = sum(isinstance(m, triton_conv.TritonConv2d) for m in method.model.modules())
        logits = torch.cat([method.adapt(image) for image in images])
        runs.append((swapped, logits, torch.cat([p.detach().flatten() for p in method.model.encoder.parameters()])))
    (none, logits, weights), (swapped, triton_logits, triton_weights) = runs
    assert none == 0 and swapped == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert sum(isinstance(m, triton_norm.TritonGroupNorm) for m in method.model.modules()) == sum(
        isinstance(m, torch.nn.GroupNorm) for m in model.modules()
    )  # the norms went to the fused kernels too
    assert torch.allclose(triton_logits, logits, atol=1e-10)
    assert torch.allclose(triton_weights, weights, atol=1e-12)


def test_online_steps_on_shared_zeroed_outputs_equal_torch_convolutions(monkeypatch):
    """Atomic launches everywhere, their zeroed outputs slices of buffers zeroed once per call (after the first
    call has learnt the sizes): updates and predictions still agree with torch's convolutions in float64."""
    monkeypatch.setattr(triton_conv, "_CHOSEN", AtomicEverywhere())
    monkeypatch.setattr(triton_conv, "WEIGHT_GRAD_PROGRAMS", 4)
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    model = build_model(ModelConfig(depth=8, groups=4, img_size=8), task).to(torch.float64)
    images = torch.rand(3, 1, 3, 8, 8, dtype=torch.float64)  # the first call learns the sizes, the others use them
    runs = []
    for kernels in ("torch", "triton"):
        config = OnlineConfig(copies=2, lr=0.05, momentum=0.9, amp=False, conv_kernels=kernels, compile=False)
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(3))
        logits = torch.cat([method.adapt(image) for image in images])
        runs.append((logits, torch.cat([p.detach().flatten() for p in method.model.encoder.parameters()])))
    (logits, weights), (triton_logits, triton_weights) = runs
    assert {key[0] for key in method._calls["step"].plan} == {"out", "dx", "dw"}  # every role was planned for
    assert torch.allclose(triton_logits, logits, atol=1e-10)
    assert torch.allclose(triton_weights, weights, atol=1e-12)


@pytest.mark.parametrize("operation", sorted(triton_conv.CANDIDATES))
def test_every_candidate_tile_gives_the_same_result(operation):
    """The automatic choice may pick any of these tiles on a GPU: each must compute the same thing."""
    _, triton_call, tiles = triton_conv.CANDIDATES[operation]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64, generator=generator)
    w = torch.randn(20, 6, 3, 3, dtype=torch.float64, generator=generator)
    dy = torch.randn(2, 20, 5, 5, dtype=torch.float64, generator=generator)
    arguments = triton_conv.operation_arguments(x, w, dy, 2, 1)
    args = arguments[operation]
    expected = triton_conv.torch_reference(operation, arguments)  # (for both gradients, not through the Triton kernels)
    for tile in tiles:
        result = triton_call(*args, *tile)
        for got, want in zip(result if operation == "grads" else (result,), expected, strict=True):
            assert torch.allclose(got, want, atol=1e-12), tile


def test_both_gradients_in_one_launch_cover_every_program_of_each(monkeypatch):
    """More weight-gradient splits than one, an uneven input-gradient split, and grids of different sizes: each
    program of the shared grid must land on its own tile (the ResNet's strided and 8 px shapes)."""
    monkeypatch.setattr(triton_conv, "WEIGHT_GRAD_PROGRAMS", 5)
    generator = torch.Generator().manual_seed(4)
    for batch, cin, cout, size, stride in ((2, 16, 32, 8, 2), (1, 64, 64, 8, 1), (3, 3, 16, 6, 1)):
        x = torch.randn(batch, cin, size, size, dtype=torch.float64, generator=generator)
        w = torch.randn(cout, cin, 3, 3, dtype=torch.float64, generator=generator)
        dy = torch.randn(batch, cout, (size - 1) // stride + 1, (size - 1) // stride + 1, dtype=torch.float64, generator=generator)
        want_dx = triton_conv._torch_input_grad(dy, w, list(x.shape), stride, 1)
        want_dw = triton_conv._torch_weight_grad(dy, x, list(w.shape), stride, 1)
        for launch in (triton_conv.GradsLaunch(32, 32, 4, 32, 32), triton_conv.GradsLaunch(16, 16, 3, 16, 64, atomic=False)):
            dx, dw = triton_conv._conv_grads(dy, x, w, stride, 1, *launch)
            assert torch.allclose(dx, want_dx, atol=1e-12) and torch.allclose(dw, want_dw, atol=1e-12), (x.shape, launch)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_gradient_by_subpixel_classes_equals_torch(shape):
    """Every stride (1, 2, 3), kernel (1x1, 3x3, 7x7), padding and odd size: classes of unequal size, and kernel rows
    a class never meets."""
    batch, cin, cout, size, kernel, stride, padding = shape
    generator = torch.Generator().manual_seed(5)
    x_shape = [batch, cin, size, size]
    w = torch.randn(cout, cin, kernel, kernel, dtype=torch.float64, generator=generator)
    out = (size + 2 * padding - kernel) // stride + 1
    dy = torch.randn(batch, cout, out, out, dtype=torch.float64, generator=generator)
    expected = triton_conv._torch_input_grad(dy, w, x_shape, stride, padding)
    for tile, depth in ((32, 32), (16, 16)):
        got = triton_conv._conv_input_grad(dy, w, x_shape, stride, padding, tile, depth, 1, 4, 1, False, True)
        assert torch.allclose(got, expected, atol=1e-12), (tile, depth)


def test_ordered_split_sums_leave_their_counters_zeroed_for_the_next_launch():
    """The last program of each tile sums the splits and resets its counter: a second launch (and another shape)
    finds them zeroed and sums right again."""
    generator = torch.Generator().manual_seed(6)
    for _ in range(2):
        for batch, cin, cout, size in ((2, 64, 64, 8), (1, 20, 18, 6)):
            x = torch.randn(batch, cin, size, size, dtype=torch.float64, generator=generator)
            w = torch.randn(cout, cin, 3, 3, dtype=torch.float64, generator=generator)
            dy = torch.randn(batch, cout, size, size, dtype=torch.float64, generator=generator)
            got = triton_conv._conv_forward(x, w, 1, 1, 32, 32, 4, ordered=True)
            assert torch.allclose(got, F.conv2d(x, w, None, 1, 1), atol=1e-12)
            got = triton_conv._conv_input_grad(dy, w, list(x.shape), 1, 1, 16, 32, 3, ordered=True)
            assert torch.allclose(got, triton_conv._torch_input_grad(dy, w, list(x.shape), 1, 1), atol=1e-12)
            assert all(int(counters.abs().sum()) == 0 for counters in triton_conv._COUNTERS.values())


def test_taps_split_unevenly_over_programs_still_sum_to_the_whole():
    """A 64-channel 8 px layer (18 steps of 32 taps) over 4 splits of 5 steps: the last split runs past the taps."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 8, 8, dtype=torch.float64, generator=generator)
    w = torch.randn(64, 64, 3, 3, dtype=torch.float64, generator=generator)
    dy = torch.randn(1, 64, 8, 8, dtype=torch.float64, generator=generator)
    assert triton_conv._split_steps(64 * 9, 32, 4) == (5, 4)
    assert triton_conv._split_steps(64 * 9, 32, 4, numel=2**29) == (18, 1)  # 4 slabs would outgrow 32-bit offsets
    assert torch.allclose(triton_conv._conv_forward(x, w, 1, 1, 32, 32, 4), F.conv2d(x, w, None, 1, 1), atol=1e-12)
    expected = triton_conv._torch_input_grad(dy, w, list(x.shape), 1, 1)
    assert torch.allclose(triton_conv._conv_input_grad(dy, w, list(x.shape), 1, 1, 32, 32, 4), expected, atol=1e-12)


def test_streams_side_by_side_keep_torch_convolutions_beside_a_triton_one_stream_path():
    """With a parallel twin (vmap needs torch's convolutions), the one-stream path still takes the Triton ones: the
    twin adapts its own copy of the model."""
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    model = build_model(ModelConfig(depth=8, groups=4, img_size=8), task).to(torch.float64)
    settings = AdaptSettings(copies=2, lr=0.05, amp=False, conv_kernels="triton", per_sample="vmap", streams=2)
    method = build_method("ttt-online", model, task, settings, 10, torch.device("cpu"))
    assert triton_conv.kernels_in(method.model) == "triton where faster"
    assert triton_conv.kernels_in(method.parallel.model) == "torch"
    images = (torch.rand(4, 8, 8, 3) * 255).to(torch.uint8)
    logits = method.adapt_streams(images, [torch.tensor([0, 1]), torch.tensor([2, 3])], lambda done: None)
    assert [tuple(part.shape) for part in logits] == [(2, 10), (2, 10)] and all(part.isfinite().all() for part in logits)


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["atomic", "deterministic", "input-only"])
def test_fused_norm_kernels_equal_group_norm_then_relu(shape, mode, monkeypatch):
    """The GroupNorm + ReLU kernels forward and backward (the weight's and bias's parts added atomically, or
    summed in order under torch.use_deterministic_algorithms, or not computed), in float64 against torch."""
    assert triton_norm._uses_kernel(torch.zeros(shape[:4]), shape[4])
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: mode == "deterministic")
    (want, want_grads), (got, got_grads) = reference_and_fused(shape, weight_grads=mode != "input-only", seed=1)
    assert torch.allclose(got, want, atol=1e-12)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got_grad, want_grad, atol=1e-10)
