"""Convolution speed at the online step's shapes: cuDNN (torch) against the Triton implicit-GEMM kernels of
tta_cli/kernels/triton_conv.py, forward, input gradient and weight gradient, each timed as a CUDA graph of
`--reps` calls (so launch cost from Python is not measured, as in the step's own graph).

The shapes are the reference ResNet-26's (width 1, split after layer2) for a batch of 32 views: the stem,
layer1 (16 ch, 32 px), layer2 (its strided first convolution and 32 ch at 16 px) and the ssl head's layer3
(64 ch at 8 px). Each row also gives the largest difference to cuDNN's result, relative to its largest value.
Each row tries every Triton tile the automatic choice tries (triton_conv.CANDIDATES); the totals, over the 66
operations one step runs, give cuDNN alone, the fastest of all per operation, and, for the layers that need both
gradients, the two one after the other against the weight gradient overlapped on a side stream, and against both in one launch
(triton_conv.CANDIDATES["grads"]).

    python benchmarks/conv_speed.py [--batch 32] [--reps 50] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import functools

import torch

from tta_cli.kernels import triton_conv

# (name, in channels, out channels, size, stride, count in one step's forward, the operations a step runs there:
# the stem's input gradient is never needed, nor the weight gradients of the frozen ssl head, layer3)
ALL = ("forward", "input_grad", "weight_grad")  # triton_conv.CANDIDATES' keys
SHAPES = [
    ("stem 3->16 @32", 3, 16, 32, 1, 1, ("forward", "weight_grad")),
    ("layer1 16->16 @32", 16, 16, 32, 1, 8, ALL),
    ("layer2 16->32 @32 s2", 16, 32, 32, 2, 1, ALL),
    ("layer2 32->32 @16", 32, 32, 16, 1, 7, ALL),
    ("layer3 32->64 @16 s2", 32, 64, 16, 2, 1, ("forward", "input_grad")),
    ("layer3 64->64 @8", 64, 64, 8, 1, 7, ("forward", "input_grad")),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def graph_time_us(call, reps: int) -> float:
    """Microseconds per call of `call()`, replayed as one CUDA graph of `reps` calls: the timing the automatic
    choice itself uses (triton_conv.graph_seconds)."""
    return triton_conv.graph_seconds(call, reps) * 1e6


def overlapped(first, second):
    """`first()` on the current stream and `second()` on a side stream at the same time, joined at the end."""
    side = torch.cuda.Stream()

    def call():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            second()
        first()
        main.wait_stream(side)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"convolution speed on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, batch {args.batch}, "
          f"TF32 for fp32 convolutions: {torch.backends.cudnn.allow_tf32}")
    print(f"{'shape':<22} {'dtype':<5} {'op':<12} {'cudnn us':>9} {'tile':>9} {'triton us':>10} {'speedup':>8} {'rel diff':>9}")
    totals: dict[tuple, float] = {}
    for name, cin, cout, size, stride, count, needed in SHAPES:
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            generator = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(args.batch, cin, size, size, device=device, dtype=dtype, generator=generator)
            w = torch.randn(cout, cin, 3, 3, device=device, dtype=dtype, generator=generator) * 0.1
            dy = torch.randn(args.batch, cout, size // stride, size // stride, device=device, dtype=dtype, generator=generator)
            arguments = triton_conv.operation_arguments(x, w, dy, stride, 1)
            reference = {}
            best_of: dict[str, float] = {}
            for op, (torch_call, triton_call, tiles) in triton_conv.CANDIDATES.items():
                if op == "grads":  # both gradients in one launch: below, where a step needs both
                    continue
                reference[op] = call = functools.partial(torch_call, *arguments[op])  # cuDNN
                cudnn_us = graph_time_us(call, args.reps)
                expected = call().float()
                best = cudnn_us
                for tile in tiles:
                    fast = functools.partial(triton_call, *arguments[op], *tile)
                    triton_us = graph_time_us(fast, args.reps)
                    best = min(best, triton_us)
                    difference = float((fast().float() - expected).abs().max() / expected.abs().max())
                    print(f"{name:<22} {dtype_name:<5} {op:<12} {cudnn_us:>9.1f} {triton_conv.label(tile):>9} {triton_us:>10.1f} "
                          f"{cudnn_us / triton_us:>7.2f}x {difference:>9.1e}", flush=True)
                best_of[op] = best
                if op in needed:
                    totals[(dtype_name, "cudnn")] = totals.get((dtype_name, "cudnn"), 0.0) + cudnn_us * count
                    totals[(dtype_name, "fastest")] = totals.get((dtype_name, "fastest"), 0.0) + best * count
            if needed != ALL:
                continue
            # where a step needs both gradients: one after the other against the weight gradient on a side stream (cuDNN's)
            serial = graph_time_us(lambda grads=reference: (grads["input_grad"](), grads["weight_grad"]()), args.reps)
            parallel = graph_time_us(overlapped(reference["input_grad"], reference["weight_grad"]), args.reps)
            print(f"{name:<22} {dtype_name:<5} both gradients, cuDNN: one stream {serial:.1f} us, weight gradient on a side "
                  f"stream {parallel:.1f} us (fastest kernels, one stream: {best_of['input_grad'] + best_of['weight_grad']:.1f})")
            _, fused_call, fused_launches = triton_conv.CANDIDATES["grads"]
            fused = {launch: graph_time_us(functools.partial(fused_call, *arguments["grads"], *launch), args.reps) for launch in fused_launches}
            fastest = min(fused, key=fused.get)
            print(f"{name:<22} {dtype_name:<5} both gradients in one launch: {fused[fastest]:.1f} us ({triton_conv.label(fastest)})")
            apart = best_of["input_grad"] + best_of["weight_grad"]
            saved = (dtype_name, "saved by fused grads")  # off "fastest", where both gradients in one launch win
            totals[saved] = totals.get(saved, 0.0) + count * (apart - min(fused[fastest], apart))
            totals[(dtype_name, "cudnn serial grads")] = totals.get((dtype_name, "cudnn serial grads"), 0.0) + serial * count
            totals[(dtype_name, "cudnn overlapped grads")] = totals.get((dtype_name, "cudnn overlapped grads"), 0.0) + parallel * count
    print("\none step's convolutions: each operation a step runs, x its count (the gradient pairs: the layers that need both)")
    for (dtype_name, kind), total in sorted(totals.items()):
        print(f"  {dtype_name} {kind:<24}: {total:8.1f} us")


if __name__ == "__main__":
    main()
