"""2-D convolution (forward, input gradient, weight gradient) as Triton implicit-GEMM kernels on NCHW tensors: their
tilings, the choice between them and cuDNN per shape, and the torch ops (the kernels are in conv_kernels.py).

Why: the online step of the reference ResNet-26 convolves 32 images of 16-64 channels at 8-32 px. cuDNN runs
each such convolution in ~15 us (with NCHW<->NHWC transposes around its kernels), far above what its ~2 MB of
data needs, and the convolutions are most of the step's device time (docs/speed-notes.md). An implicit GEMM reads the input
where it lies (no im2col copy, no transposes): one program per tile of output pixels x output channels, the
K = in_channels x kH x kW reduction gathered from the input with masks for padding and stride. Neither these
kernels nor cuDNN's win at every shape, so each operation runs on whichever measured faster for its shapes
(`_run`, timed once per shape at first use).

`conv2d(x, weight, stride, padding)` is a torch custom op with its own backward, so torch.compile keeps it as one
opaque call and CUDA graphs capture it. On the CPU it runs through Triton's interpreter when TRITON_INTERPRET=1
is set before import (the tests do, to check the kernels in float64 against torch's convolution), else through
`torch.nn.functional.conv2d` and its autograd.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tta_cli.kernels import zeroed_outputs
from tta_cli.kernels.conv_kernels import tl, triton

if triton is not None:
    from tta_cli.kernels.conv_kernels import gathered_kernel, grads_kernel, input_grad_subpixel_kernel, weight_grad_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Where the kernels are even tried: the CIFAR ResNets' latency-bound convolutions (3-64 channels, 8-32 px, tensors of
# up to 2^19 elements at a batch of 32), the range they were written and measured for (docs/speed-notes.md). Outside
# it they have no measured win, and the first call would compile and time every tile at every shape (minutes for a
# ResNet-50 at 224 px). So use_triton_convs swaps only convolutions of at most MAX_CHANNELS channels in and out, and
# `_run` sends tensors of more than MAX_ELEMENTS elements straight to torch, untimed.
MAX_CHANNELS = 64
MAX_ELEMENTS = 2**20


def available(device: torch.device) -> bool:
    """Whether the kernels can run for tensors on `device` (CUDA with triton, or the interpreter on the CPU)."""
    return triton is not None and (device.type == "cuda" or INTERPRET)


def _block(size: int, largest: int) -> int:
    """A power-of-two tile side >= 16 (tl.dot's smallest) covering `size` up to `largest`."""
    return max(16, min(largest, triton.next_power_of_2(size)))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs take TF32 when cuDNN would (torch's default for convolutions); float64 and 16-bit are exact."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def _accumulator(dtype: torch.dtype):
    """float64 accumulates in float64 (the parity tests); everything else in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(x_shape, w_shape, stride: int, padding: int) -> tuple[int, int]:
    height, width = x_shape[2:]
    kernel_h, kernel_w = w_shape[2:]
    return (height + 2 * padding - kernel_h) // stride + 1, (width + 2 * padding - kernel_w) // stride + 1


def _conv_forward(
    x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, tile: int = 64, depth: int = 32, splits: int = 1,
    warps: int = 4, stages: int = 3, atomic: bool = False, subpixel: bool = False, ordered: bool = False,
) -> torch.Tensor:
    """`tile` output pixels x up to 64 output channels per program, `depth` taps per step of the sum, the taps
    split over `splits` programs (for grids too small to fill the GPU), whose partial sums are added after (or,
    `atomic`, into the zeroed output as each finishes). `warps` and `stages` are Triton's launch options."""
    if subpixel:
        raise ValueError("sub-pixel classes are for the input gradient only")
    out_shape = (x.shape[0], w.shape[0], *_geometry(x.shape, w.shape, stride, padding))
    launch = Launch(tile, depth, splits, warps, stages, atomic, ordered=ordered)
    return _launch_gathered(x, w, tuple(x.shape), out_shape, out_shape, stride, padding, launch, "out")


def _conv_input_grad(
    dy: torch.Tensor, w: torch.Tensor, x_shape, stride: int, padding: int, tile: int = 64, depth: int = 32, splits: int = 1,
    warps: int = 4, stages: int = 3, atomic: bool = False, subpixel: bool = False, ordered: bool = False,
) -> torch.Tensor:
    """The same tiling over the input's pixels and channels, the taps gathered from dy (or, `subpixel`, one GEMM
    per sub-pixel class of the input, without the taps a stride leaves out; no splits)."""
    if subpixel:
        return _conv_input_grad_subpixel(dy, w, x_shape, stride, padding, tile, depth, warps, stages)
    launch = Launch(tile, depth, splits, warps, stages, atomic, ordered=ordered)
    return _launch_gathered(dy, w, tuple(x_shape), tuple(dy.shape), tuple(x_shape), stride, padding, launch, "dx")


class Launch(NamedTuple):
    """How one of the kernels is launched: what the automatic choice picks between (CANDIDATES)."""

    tile: int  # rows of the GEMM per program: output pixels (weight gradient: pixels per step of its sum)
    depth: int  # taps per step of the sum
    splits: int = 1  # programs the sum is split over (weight gradient: 0, as many as fill the GPU)
    warps: int = 4  # Triton's num_warps
    stages: int = 3  # Triton's num_stages (software pipelining of the loads)
    atomic: bool = False  # split sums added into a zeroed fp32 output as they finish (no reduction kernel after; unordered)
    subpixel: bool = False  # input gradient only: by sub-pixel classes (input_grad_subpixel_kernel), for strided layers
    ordered: bool = False  # forward and input gradient: split sums added by each tile's last program, in order (deterministic)


def _launch_gathered(source, w, x_shape, y_shape, result_shape, stride, padding, launch: Launch, role: str) -> torch.Tensor:
    """Either gathered GEMM (forward: x -> y, input gradient: dy -> dx) over `result_shape` (B, columns, H', W'):
    its pixels are the GEMM's rows, its channels the columns, and `source`'s channels x kH x kW the taps. `role`
    names the result for zeroed_outputs ("out", "dx") and picks the kernel's branch."""
    batch, channels, height, width = x_shape
    out_channels, _, kernel_h, kernel_w = w.shape
    columns = result_shape[1]
    pixels = batch * result_shape[2] * result_shape[3]
    taps = source.shape[1] * kernel_h * kernel_w  # the gathered tensor's channels x the kernel window
    bn, bk = _block(columns, 64), _block(taps, launch.depth)
    steps, splits = _split_steps(taps, bk, launch.splits, 0 if launch.atomic else pixels * columns)
    atomic = launch.atomic and splits > 1
    ordered = launch.ordered and splits > 1 and not atomic
    tiles = triton.cdiv(pixels, launch.tile) * triton.cdiv(columns, bn)
    if ordered:  # the output itself, the splits' slabs beside it, a counter per tile
        result = torch.empty(result_shape, device=source.device, dtype=source.dtype)
        partials = _sum_buffer(splits, result_shape, source)
        counters = _tile_counters(source.device, tiles)
    else:
        result = _sum_buffer(splits, result_shape, source, atomic, role)
        partials = counters = result  # (not read)
    grid = (triton.cdiv(pixels, launch.tile), triton.cdiv(columns, bn), splits)
    gathered_kernel[grid](
        source, w, result, partials, counters, height, width, y_shape[2], y_shape[3], channels, out_channels, pixels, taps,
        KH=kernel_h, KW=kernel_w, STRIDE=stride, PAD=padding, BM=launch.tile, BN=bn, BK=bk, STEPS=steps,
        PRECISION=_precision(source.dtype), ACC=_accumulator(source.dtype), ATOMIC=atomic, ORDERED=ordered, SPLITS=splits,
        INPUT_GRAD=role == "dx", num_warps=launch.warps, num_stages=launch.stages,
    )
    return result if ordered else _summed(result, splits, atomic, source.dtype)


COUNTER_SLOTS = 1 << 14  # tiles one ordered launch may have (the ResNet's largest grid is ~1,000)
_COUNTERS: dict[tuple, torch.Tensor] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The zeroed int32 counters ordered launches count their arrived splits in, one set per device and stream:
    launches on one stream run one after another and each leaves them zeroed, while launches on two streams (a
    prediction beside an update) may run at once. Made at a stream's first ordered launch (inside a CUDA graph
    capture, its zeroing becomes a node of the graph, which is harmless)."""
    if tiles > COUNTER_SLOTS:
        raise ValueError(f"an ordered launch of {tiles} tiles needs more than the {COUNTER_SLOTS} counters")
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(COUNTER_SLOTS, device=device, dtype=torch.int32)
    return _COUNTERS[key]


def _conv_input_grad_subpixel(
    dy: torch.Tensor, w: torch.Tensor, x_shape, stride: int, padding: int, tile: int = 64, depth: int = 32, warps: int = 4, stages: int = 3,
) -> torch.Tensor:
    """The input gradient by sub-pixel classes (input_grad_subpixel_kernel): for strided convolutions."""
    batch, channels, height, width = x_shape
    out_channels, _, kernel_h, kernel_w = w.shape
    taps_h, taps_w = triton.cdiv(kernel_h, stride), triton.cdiv(kernel_w, stride)
    bn, bk = _block(channels, 64), _block(out_channels * taps_h * taps_w, depth)
    steps = triton.cdiv(out_channels * taps_h * taps_w, bk)
    dx = torch.empty(tuple(x_shape), device=dy.device, dtype=dy.dtype)
    largest = batch * triton.cdiv(height, stride) * triton.cdiv(width, stride)  # the class with the most pixels
    grid = (triton.cdiv(largest, tile), triton.cdiv(channels, bn), stride * stride)
    input_grad_subpixel_kernel[grid](
        dy, w, dx, batch, height, width, dy.shape[2], dy.shape[3], channels, out_channels,
        KH=kernel_h, KW=kernel_w, STRIDE=stride, PAD=padding, BM=tile, BN=bn, BK=bk, STEPS=steps,
        PRECISION=_precision(dy.dtype), ACC=_accumulator(dy.dtype), TAPS_H=taps_h, TAPS_W=taps_w, num_warps=warps, num_stages=stages,
    )
    return dx


def _split_steps(taps: int, depth: int, splits: int, numel: int = 0) -> tuple[int, int]:
    """(steps per split, splits) covering cdiv(taps, depth) steps, no split left empty; one split where the partial
    sums of an output of `numel` elements would outgrow 32-bit indexing."""
    if splits * numel >= 2**31:
        splits = 1
    steps = triton.cdiv(triton.cdiv(taps, depth), splits)
    return steps, triton.cdiv(triton.cdiv(taps, depth), steps)


def _sum_buffer(splits: int, shape: tuple[int, ...], like: torch.Tensor, atomic: bool = False, role: str = "out") -> torch.Tensor:
    """Where a launch writes its sums: the output itself for one split; otherwise one fp32 (or float64) slab per
    split, summed afterwards (_summed); `atomic`: a single zeroed fp32 slab the splits add into (inside a
    zeroed_outputs.one_fill, one zeroed with the call's other outputs when it started)."""
    if atomic:
        return zeroed_outputs.zeros(role, (1, *shape), like.device, torch.promote_types(like.dtype, torch.float32))
    if splits == 1:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    return torch.empty(splits, *shape, device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))


def _summed(sums: torch.Tensor, splits: int, atomic: bool, dtype: torch.dtype) -> torch.Tensor:
    """The result in `dtype` from what a launch wrote into _sum_buffer(splits, ..., atomic)."""
    if atomic:
        return sums[0].to(dtype)
    return sums if splits == 1 else sums.sum(0).to(dtype)


WEIGHT_GRAD_PROGRAMS = 256  # programs the pixel sum is split over (with the tiles of the weight), to fill the GPU


def _weight_split(pixels: int, taps: int, out_channels: int, tile: int, depth: int, splits: int) -> tuple[int, int, int, int]:
    """The weight gradient's tiling: (channels per tile, taps per tile, pixels per split, splits), `splits` 0 for as
    many as make WEIGHT_GRAD_PROGRAMS programs in all, no split left empty."""
    bn, bk = _block(out_channels, 64), _block(taps, depth)
    tiles = triton.cdiv(out_channels, bn) * triton.cdiv(taps, bk)
    splits = max(1, min(triton.cdiv(pixels, tile), splits or WEIGHT_GRAD_PROGRAMS // tiles))
    per_split = triton.cdiv(triton.cdiv(pixels, splits), tile) * tile
    return bn, bk, per_split, triton.cdiv(pixels, per_split)


def _conv_weight_grad(
    dy: torch.Tensor, x: torch.Tensor, w_shape, stride: int, padding: int, tile: int = 64, depth: int = 64, splits: int = 0,
    warps: int = 4, stages: int = 3, atomic: bool = False, subpixel: bool = False, ordered: bool = False,
) -> torch.Tensor:
    """Tiles of the weight (output channels x taps), the pixel sum split over `splits` programs per tile (0: as many
    as make WEIGHT_GRAD_PROGRAMS in all), summed after or, `atomic`, added into a zeroed fp32 weight."""
    if subpixel or ordered:
        raise ValueError("sub-pixel classes are for the input gradient only, ordered sums for the gathered GEMMs")
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = w_shape
    out_h, out_w = dy.shape[2:]
    pixels, taps = batch * out_h * out_w, channels * kernel_h * kernel_w
    bn, bk, per_split, splits = _weight_split(pixels, taps, out_channels, tile, depth, splits)
    atomic = atomic and splits > 1
    partial = _sum_buffer(splits, (out_channels, taps), x, atomic, "dw")
    grid = (triton.cdiv(out_channels, bn), triton.cdiv(taps, bk), splits)
    weight_grad_kernel[grid](
        dy, x, partial, height, width, out_h, out_w, channels, out_channels, pixels, taps,
        KH=kernel_h, KW=kernel_w, STRIDE=stride, PAD=padding, BM=tile, BN=bn, BK=bk, STEPS=per_split // tile,
        PRECISION=_precision(x.dtype), ACC=_accumulator(x.dtype), ATOMIC=atomic, num_warps=warps, num_stages=stages,
    )
    return _summed(partial, splits, atomic, x.dtype).view(w_shape)


class GradsLaunch(NamedTuple):
    """How `_conv_grads` launches both gradients of a convolution as one grid (CANDIDATES["grads"])."""

    input_tile: int  # input-gradient pixels per program
    input_depth: int  # its taps per step
    input_splits: int  # programs its sum is split over
    weight_tile: int  # weight-gradient pixels per step (its sum is split to fill the GPU, as _conv_weight_grad's)
    weight_depth: int  # its taps per tile
    warps: int = 4
    stages: int = 1
    atomic: bool = True  # split sums added into zeroed fp32 outputs (unordered), else slabs summed after


def _conv_grads(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, input_tile: int = 64, input_depth: int = 32,
    input_splits: int = 1, weight_tile: int = 64, weight_depth: int = 32, warps: int = 4, stages: int = 1, atomic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) of one convolution from one launch of grads_kernel: the tilings of _conv_input_grad and
    _conv_weight_grad, their programs side by side in one grid."""
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = w.shape
    out_h, out_w = dy.shape[2:]
    d_pixels, d_taps = batch * height * width, out_channels * kernel_h * kernel_w  # the input gradient's GEMM
    d_bn, d_bk = _block(channels, 64), _block(d_taps, input_depth)
    d_steps, d_splits = _split_steps(d_taps, d_bk, input_splits, 0 if atomic else d_pixels * channels)
    d_atomic = atomic and d_splits > 1
    w_pixels, w_taps = batch * out_h * out_w, channels * kernel_h * kernel_w  # the weight gradient's
    w_bn, w_bk, per_split, w_splits = _weight_split(w_pixels, w_taps, out_channels, weight_tile, weight_depth, 0)
    w_atomic = atomic and w_splits > 1
    dx_sums = _sum_buffer(d_splits, tuple(x.shape), dy, d_atomic, "dx")
    dw_sums = _sum_buffer(w_splits, (out_channels, w_taps), x, w_atomic, "dw")
    d_tiles_m, d_tiles_n = triton.cdiv(d_pixels, input_tile), triton.cdiv(channels, d_bn)
    w_tiles_n, w_tiles_k = triton.cdiv(out_channels, w_bn), triton.cdiv(w_taps, w_bk)
    grid = (d_tiles_m * d_tiles_n * d_splits + w_tiles_n * w_tiles_k * w_splits,)
    grads_kernel[grid](
        dy, w, x, dx_sums, dw_sums, height, width, out_h, out_w, channels, out_channels, d_pixels, d_taps, w_pixels, w_taps,
        d_tiles_m, d_tiles_n, d_splits, w_tiles_n, w_tiles_k, KH=kernel_h, KW=kernel_w, STRIDE=stride, PAD=padding,
        D_BM=input_tile, D_BN=d_bn, D_BK=d_bk, D_STEPS=d_steps, D_ATOMIC=d_atomic,
        W_BM=weight_tile, W_BN=w_bn, W_BK=w_bk, W_STEPS=per_split // weight_tile, W_ATOMIC=w_atomic,
        PRECISION=_precision(x.dtype), ACC=_accumulator(x.dtype), num_warps=warps, num_stages=stages,
    )
    return _summed(dx_sums, d_splits, d_atomic, dy.dtype), _summed(dw_sums, w_splits, w_atomic, x.dtype).view(w.shape)


def _torch_forward(x, w, stride, padding):
    return F.conv2d(x, w, None, stride, padding)


def _torch_input_grad(dy, w, x_shape, stride, padding):
    x = torch.empty(x_shape, device=dy.device, dtype=dy.dtype)  # only its shape is read
    return torch.ops.aten.convolution_backward(dy, x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [True, False, False])[0]


def _torch_weight_grad(dy, x, w_shape, stride, padding):
    w = torch.empty(w_shape, device=x.device, dtype=x.dtype)  # only its shape is read
    return torch.ops.aten.convolution_backward(dy, x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [False, True, False])[1]


def _separate_grads(dy, x, w, stride, padding):
    """Both gradients as two operations, each on its own choice (cuDNN or a Triton launch): what a fused launch of
    _conv_grads must beat."""
    return _run("input_grad", dy, w, list(x.shape), stride, padding), _run("weight_grad", dy, x, list(w.shape), stride, padding)


# Per operation: torch's kernel (cuDNN) and the Triton launches tried (Launch's fields in order; the rest default).
# No one wins everywhere (benchmarks/conv_speed.py; docs/speed-notes.md): Triton wins most weight gradients and
# forwards, cuDNN most input gradients, and the best launch differs by layer, so each shape is timed. The split
# launches are for the small grids (the 64-channel 8 px layers and the 1-image prediction), whose 64 programs leave
# most of the GPU idle. Their partial sums would cost one more kernel each, so most split launches are `atomic`: they
# add into a zeroed output instead, in no fixed order, so not bitwise reproducible run to run (skipped under
# torch.use_deterministic_algorithms; one plain split launch per operation remains for that). Inside an online
# method's calls those outputs are zeroed together when the call starts (zeroed_outputs.py); the choice times each
# atomic launch with its own fill. The lists are the launches that the stream step and a ResNet-50 chose out of
# benchmarks/conv_sweep.py's winners (72 launches per operation at every shape): no pipelining (stages 1) and 2 or 8
# warps often beat Triton's defaults. Each launch tried costs a compile (~1 s) at each new shape on a machine's first
# run. _ORDERED: the chosen atomic split launches with their sums in order by each tile's last program instead (no
# zeroed output, deterministic): the choice where atomics are not allowed.
_ORDERED = (Launch(32, 32, 4, 8, 1, ordered=True), Launch(32, 32, 4, 2, 1, ordered=True), Launch(32, 32, 4, ordered=True))
CANDIDATES = {
    "forward": (_torch_forward, _conv_forward, (
        (64, 32, 1), (128, 32, 1), (128, 32, 1, 2, 1), (32, 32, 1, 4, 1), (32, 32, 4),
        Launch(32, 32, 4, atomic=True), Launch(32, 32, 4, 8, 1, True), Launch(64, 32, 4, 8, 3, True), Launch(64, 32, 4, 2, 1, True),
        *_ORDERED,
    )),
    "input_grad": (_torch_input_grad, _conv_input_grad, (
        (64, 32, 1), (64, 32, 1, 4, 1), (32, 32, 1, 2, 1), (32, 32, 4), Launch(32, 32, 4, 8, 1, True), Launch(32, 32, 4, 2, 1, True),
        # the strided layers' input gradients by sub-pixel classes, which beat cuDNN there (conv_speed.py)
        Launch(64, 32, 1, 4, 1, subpixel=True), Launch(32, 32, 1, 2, 1, subpixel=True), Launch(32, 32, 1, 4, 3, subpixel=True),
        *_ORDERED,
    )),
    "weight_grad": (_torch_weight_grad, _conv_weight_grad, (
        (64, 32), (128, 64), Launch(64, 32, 0, atomic=True), Launch(64, 32, 0, 4, 1, True), Launch(128, 64, 0, atomic=True),
        Launch(128, 64, 0, 4, 1, True),
    )),
    # Both gradients of a layer that needs both (the encoder's), in one launch, against the two separately. The
    # tilings are the sweep's best for the two apart at layer1 and layer2 (conv_speed.py).
    "grads": (_separate_grads, _conv_grads, (
        GradsLaunch(64, 32, 1, 64, 32, 4, 1), GradsLaunch(32, 32, 1, 64, 32, 2, 1), GradsLaunch(32, 32, 4, 64, 32, 2, 1),
        GradsLaunch(32, 32, 4, 64, 32, 4, 1), GradsLaunch(64, 32, 1, 64, 32, 4, 1, atomic=False),
    )),
}


def label(launch: tuple) -> str:
    """A launch as the choice log prints it: "64x32x4" (tile, depth, splits as given), then "w8", "s2" where the
    warps or stages differ from Triton's defaults, and "atomic"; both gradients' as "dx 64x32x1 + dw 64x32 ..."."""
    if isinstance(launch, GradsLaunch):
        inputs = f"dx {launch.input_tile}x{launch.input_depth}x{launch.input_splits} + dw {launch.weight_tile}x{launch.weight_depth}"
        return label(Launch(0, 0, 0, launch.warps, launch.stages, launch.atomic)).replace("0x0x0", inputs)
    fields = Launch(*launch) if len(launch) > 2 else Launch(*launch, 0)
    text = "x".join(map(str, launch[:3]))
    if fields.warps != 4:
        text += f" w{fields.warps}"
    if fields.stages != 3:
        text += f" s{fields.stages}"
    return text + (" atomic" if fields.atomic else "") + (" subpixel" if fields.subpixel else "") + (" ordered" if fields.ordered else "")


def operation_arguments(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, stride: int, padding: int) -> dict[str, tuple]:
    """Each operation's arguments as its implementations in CANDIDATES take them, for convolving `x` with `w` (`dy`:
    the gradient of the output): to time or check every implementation at one shape."""
    return {
        "forward": (x, w, stride, padding),
        "input_grad": (dy, w, list(x.shape), stride, padding),
        "weight_grad": (dy, x, list(w.shape), stride, padding),
        "grads": (dy, x, w, stride, padding),
    }


def torch_reference(operation: str, arguments: dict[str, tuple]) -> tuple[torch.Tensor, ...]:
    """torch's own result for `operation` on operation_arguments' `arguments`, as a tuple (both gradients: torch's
    two, where the operation's torch_call would go through the per-operation choice): what a launch is checked
    against."""
    if operation == "grads":
        return _torch_input_grad(*arguments["input_grad"]), _torch_weight_grad(*arguments["weight_grad"])
    return (CANDIDATES[operation][0](*arguments[operation]),)


_CHOSEN: dict[tuple, tuple[int, ...] | None] = {}  # (operation, shapes, dtype, stride, padding, TF32) -> tile or None (torch)


def graph_seconds(call, reps: int = 10) -> float:
    """Seconds per call of `call()`, replayed as a CUDA graph (the way the step runs it), best of three."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000 / reps)
    return best


def _run(operation: str, *args):
    """`operation` by its fastest implementation for these shapes: at a shape's first use (outside a CUDA graph
    capture; a shape first seen during a capture runs torch's kernel, uncached) each launch is run once and checked
    against torch's result (_agreeing), then timed against it."""
    torch_call, triton_call, _ = CANDIDATES[operation]
    largest = max(a.numel() if isinstance(a, torch.Tensor) else math.prod(a) if isinstance(a, list) else 0 for a in args)
    if not available(args[0].device) or largest > MAX_ELEMENTS:  # (the kernels' 32-bit indexing needs < 2^31 too)
        return torch_call(*args)
    shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else tuple(a) if isinstance(a, list) else a for a in args]
    key = (operation, *shapes, args[0].dtype, torch.backends.cudnn.allow_tf32)
    if key not in _CHOSEN:
        if INTERPRET or torch.cuda.is_current_stream_capturing():
            return triton_call(*args) if INTERPRET else torch_call(*args)
        with zeroed_outputs.suspended():  # each timed launch zeroes its own output, as a lone launch would
            _CHOSEN[key] = _fastest(operation, args, key)
    tile = _CHOSEN[key]
    return torch_call(*args) if tile is None else triton_call(*args, *tile)


def _fastest(operation: str, args: tuple, key: tuple):
    """The fastest of torch's kernel (None) and the launches that agree with it, timed in CUDA graphs."""
    torch_call, triton_call, tiles = CANDIDATES[operation]
    deterministic = torch.are_deterministic_algorithms_enabled()
    launches = [tile for tile in tiles if not (deterministic and getattr(tile, "atomic", False))]
    launches = _agreeing(triton_call, args, launches, torch_call(*args), key)
    times = {None: graph_seconds(lambda: torch_call(*args))}
    for tile in launches:
        try:
            times[tile] = graph_seconds(lambda tile=tile: triton_call(*args, *tile))
        except Exception as error:  # a tile this GPU or triton version cannot compile: the others remain
            _warn_once(error, tile, key)
    return min(times, key=times.get)


def _agreeing(triton_call, args, launches: list, expected, key: tuple) -> list:
    """The launches whose result on `args` matches `expected` (torch's convolution; for both gradients at once, the
    two apart, each already checked so), each run once first, side by side
    (run_side_by_side: their first runs at a new shape are their compiles). A launch that fails or disagrees
    (beyond TF32's or bf16's rounding: a kernel bug on this GPU or Triton version) is left out with a warning;
    the timing sees only the rest."""
    kept = []
    for launch, result in zip(launches, run_side_by_side(triton_call, args, launches), strict=True):
        if isinstance(result, Exception):
            _warn_once(result, launch, key)
        elif not _close(result, expected):
            _warn_once(LaunchDisagrees("its result differs from torch's convolution"), launch, key)
        else:
            kept.append(launch)
    return kept


def run_side_by_side(call, args, launches: list) -> list:
    """`call(*args, *launch)` for each launch, on a pool of threads, on the caller's device and stream; each
    result, or the exception it raised. A launch's first run at a new shape compiles it (~1 s each, most of a
    shape's first-use cost), and Triton's compiler leaves Python's lock free for most of it, so the compiles overlap."""
    device = args[0].device
    caller = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def run(launch):
        with contextlib.ExitStack() as stack:
            if caller is not None:  # a new thread starts on the default device and stream
                stack.enter_context(torch.cuda.device(device))
                stack.enter_context(torch.cuda.stream(caller))
            try:
                return call(*args, *launch)
            except Exception as error:  # the caller decides what a failure means
                return error

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(launches), os.cpu_count() or 1))) as pool:
        return list(pool.map(run, launches))


def _close(result, expected) -> bool:
    """Whether `result` (a tensor or a tuple of them) is `expected` up to TF32's or bf16's rounding: relative to the
    largest value, as a sum of products rounds (a wrong kernel is off by far more)."""
    if isinstance(expected, tuple):
        return isinstance(result, tuple) and len(result) == len(expected) and all(map(_close, result, expected))
    if not isinstance(result, torch.Tensor) or result.shape != expected.shape:
        return False
    tolerance = 1e-2 if expected.dtype in (torch.float32, torch.float64) else 5e-2
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return float((result.float() - expected.float()).abs().max()) <= tolerance * scale + 1e-6


class LaunchDisagrees(Exception):
    """A launch whose result is not torch's convolution's (left out of the choice)."""


_WARNED: set[str] = set()


def _warn_once(error: Exception, tile: tuple[int, ...], key: tuple) -> None:
    """One warning per kind of failure (a missing compiler would otherwise fail every tile of every shape)."""
    kind = type(error).__name__
    if kind not in _WARNED:
        _WARNED.add(kind)
        message = f"a Triton convolution tile failed ({kind}: {str(error).splitlines()[0] if str(error) else ''}; tile {tile}, {key})"
        warnings.warn(f"{message}; such tiles are skipped, cuDNN and the other tiles remain", RuntimeWarning, stacklevel=3)


def choices() -> dict[tuple, str]:
    """What `_run` chose so far, readable: key -> "torch" (for "grads": "separate") or "triton " + label(launch)."""
    unfused = {"grads": "separate"}  # both gradients as two operations, each on its own choice
    return {key: unfused.get(key[0], "torch") if tile is None else "triton " + label(tile) for key, tile in _CHOSEN.items()}


@torch.library.custom_op("tta::conv2d", mutates_args=())
def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """Convolution without bias, dilation or groups (what the CIFAR ResNets use)."""
    return _run("forward", x.contiguous(), weight.contiguous(), stride, padding)


@torch.library.custom_op("tta::conv2d_input_grad", mutates_args=())
def conv2d_input_grad(dy: torch.Tensor, weight: torch.Tensor, x_shape: list[int], stride: int, padding: int) -> torch.Tensor:
    return _run("input_grad", dy.contiguous(), weight.contiguous(), x_shape, stride, padding)


@torch.library.custom_op("tta::conv2d_weight_grad", mutates_args=())
def conv2d_weight_grad(dy: torch.Tensor, x: torch.Tensor, w_shape: list[int], stride: int, padding: int) -> torch.Tensor:
    return _run("weight_grad", dy.contiguous(), x.contiguous(), w_shape, stride, padding)


@torch.library.custom_op("tta::conv2d_grads", mutates_args=())
def conv2d_grads(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients, for layers that need both: one launch where that is faster than two."""
    return _run("grads", dy.contiguous(), x.contiguous(), weight.contiguous(), stride, padding)


@conv2d.register_fake
def _(x, weight, stride, padding):
    out_h, out_w = _geometry(x.shape, weight.shape, stride, padding)
    return x.new_empty(x.shape[0], weight.shape[0], out_h, out_w)


@conv2d_input_grad.register_fake
def _(dy, weight, x_shape, stride, padding):
    return dy.new_empty(x_shape)


@conv2d_weight_grad.register_fake
def _(dy, x, w_shape, stride, padding):
    return x.new_empty(w_shape)


@conv2d_grads.register_fake
def _(dy, x, weight, stride, padding):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride, ctx.padding = stride, padding


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
        dx, dw = conv2d_grads(grad, x, weight, ctx.stride, ctx.padding)
        return dx, dw, None, None
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = conv2d_input_grad(grad, weight, list(x.shape), ctx.stride, ctx.padding)
    if ctx.needs_input_grad[1]:
        dw = conv2d_weight_grad(grad, x, list(weight.shape), ctx.stride, ctx.padding)
    return dx, dw, None, None


conv2d.register_autograd(_backward, setup_context=_setup_context)


class TritonConv2d(nn.Conv2d):
    """An nn.Conv2d whose forward (and backward) run the kernels above; same parameters, same state dict."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            x, weight = x.to(dtype), weight.to(dtype)
        out = conv2d(x, weight, self.stride[0], self.padding[0])
        return out if bias is None else out + bias.view(1, -1, 1, 1).to(out.dtype)


def supported(conv: nn.Module) -> bool:
    """Plain convolutions the kernels cover: square stride and padding, no dilation, groups or padding modes."""
    return (
        type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1] and conv.stride[0] == conv.stride[1]
    )


def use_triton_convs(module: nn.Module) -> int:
    """Swap every supported nn.Conv2d of at most MAX_CHANNELS channels in and out under `module` for a TritonConv2d
    sharing its parameters (in place); returns how many were swapped."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if supported(child) and max(child.in_channels, child.out_channels) <= MAX_CHANNELS:
                replacement = TritonConv2d.__new__(TritonConv2d)
                replacement.__dict__.update(child.__dict__)  # the same Parameter objects, hooks and settings
                setattr(parent, name, replacement)
                swapped += 1
    return swapped


def kernels_in(model: nn.Module) -> str:
    """Who runs `model`'s convolutions, for results files: "triton where faster" once use_triton_convs swapped
    them (each operation on the faster of cuDNN and Triton), else "torch"."""
    return "triton where faster" if any(isinstance(m, TritonConv2d) for m in model.modules()) else "torch"
