"""Which Triton launch wins each convolution of the stream step: a grid of tiles x warps x pipeline stages (and
atomic and ordered split sums, and sub-pixel input gradients) against the launches the automatic choice tries now (triton_conv.CANDIDATES) and cuDNN.

Each launch is timed as triton_conv's choice times it (a CUDA graph of `--reps` calls, best of three replays), at
the reference ResNet-26's shapes (benchmarks/conv_speed.py's SHAPES) for a batch of 32 views, and for the forward
pass also at the 1-image prediction's. The grid compiles first in `--workers` processes (Triton's disk cache then
serves the timing process), so a cold machine pays ~1 s of compiling per launch once, in parallel.

Prints, per operation and shape: cuDNN, the best launch of CANDIDATES, the best of the grid, and the grid's three
fastest; then the step's convolutions in all (each shape x its count) for each of the three.

    python benchmarks/conv_sweep.py [--reps 20] [--workers 16] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import itertools
import multiprocessing
import os
import time

import torch
from conv_speed import DTYPES, SHAPES

from tta_cli.kernels import triton_conv
from tta_cli.kernels.triton_conv import Launch

WARPS = (2, 4, 8)
STAGES = (1, 2, 3)


def grid(operation: str) -> list[Launch]:
    """Every launch the sweep tries for `operation`."""
    if operation == "weight_grad":
        sizes = [(tile, depth, 0, atomic) for tile, depth in ((32, 64), (64, 64), (128, 64), (64, 32)) for atomic in (False, True)]
    else:
        sizes = [(tile, depth, 1, False) for tile, depth in ((32, 32), (64, 32), (128, 32), (32, 64))]
        sizes += [(tile, depth, 4, atomic) for tile, depth in ((32, 32), (64, 32)) for atomic in (False, True)]
        sizes += [(tile, depth, 4, "ordered") for tile, depth in ((32, 32), (64, 32))]
    options = itertools.product(sizes, WARPS, STAGES)
    launches = [
        Launch(tile, depth, splits, warps, stages, atomic=sums is True, ordered=sums == "ordered")
        for (tile, depth, splits, sums), warps, stages in options
    ]
    if operation == "input_grad":  # by sub-pixel classes too (for the strided layers)
        subpixel = itertools.product(((32, 32), (64, 32), (128, 32)), WARPS, STAGES)
        launches += [Launch(tile, depth, 1, warps, stages, subpixel=True) for (tile, depth), warps, stages in subpixel]
    return launches


def cases(batch: int) -> list[tuple]:
    """(name, operation, batch, in, out, size, stride, count in a step) for every operation the step runs."""
    rows = []
    for name, cin, cout, size, stride, count, needed in SHAPES:
        rows += [(name, operation, batch, cin, cout, size, stride, count) for operation in needed]
        rows.append((name, "forward", 1, cin, cout, size, stride, count))  # the prediction's 1-image pass
    return rows


def arguments(case: tuple, dtype: torch.dtype) -> tuple:
    """The operation's arguments at the case's shape, on the GPU."""
    _, operation, batch, cin, cout, size, stride, _ = case
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, cin, size, size, device="cuda", dtype=dtype, generator=generator)
    w = torch.randn(cout, cin, 3, 3, device="cuda", dtype=dtype, generator=generator) * 0.1
    out = (size - 1) // stride + 1
    dy = torch.randn(batch, cout, out, out, device="cuda", dtype=dtype, generator=generator)
    return triton_conv.operation_arguments(x, w, dy, stride, 1)[operation]


def compile_all(job: tuple) -> int:
    """Worker: run each launch of one case once, so Triton compiles it into its disk cache; returns failures."""
    case, dtype_name, launches = job
    args = arguments(case, DTYPES[dtype_name])
    call = triton_conv.CANDIDATES[case[1]][1]
    failed = 0
    for launch in launches:
        try:
            call(*args, *launch)
        except Exception:  # a launch this GPU cannot run (too much shared memory): timed as missing
            failed += 1
    torch.cuda.synchronize()
    return failed


def best(times: dict) -> tuple:
    key = min(times, key=times.get)
    return key, times[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    todo = cases(args.batch)
    start = time.perf_counter()
    chunk = 8  # launches per job: small jobs keep every worker busy to the end
    jobs = [(case, args.dtype, grid(case[1])[i : i + chunk]) for case in todo for i in range(0, len(grid(case[1])), chunk)]
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failures = sum(pool.map(compile_all, jobs))
    launches = sum(len(job[2]) for job in jobs)
    print(f"compiled {launches} launches ({failures} failed) in {time.perf_counter() - start:.0f} s with {args.workers} workers")
    print(f"convolution launches on {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, reps {args.reps}")
    print(f"{'shape':<22} {'op':<11} {'batch':>5} {'cudnn':>6} {'now best':>22} {'us':>6} {'sweep best':>22} {'us':>6}  next two")
    totals = {"cudnn": 0.0, "now": 0.0, "sweep": 0.0}
    winners: dict[str, set] = {}
    for case in todo:
        name, operation, batch, *_, count = case
        torch_call, triton_call, tiles = triton_conv.CANDIDATES[operation]
        call_args = arguments(case, DTYPES[args.dtype])
        cudnn = triton_conv.graph_seconds(functools.partial(torch_call, *call_args), args.reps) * 1e6
        now, sweep = {}, {}
        for launch, table in [(tile, now) for tile in tiles] + [(launch, sweep) for launch in grid(operation)]:
            try:
                table[launch] = triton_conv.graph_seconds(functools.partial(triton_call, *call_args, *launch), args.reps) * 1e6
            except Exception:
                continue
        (now_launch, now_us), (sweep_launch, sweep_us) = best(now), best(sweep)
        runner_up = sorted(sweep, key=sweep.get)[1:3]
        following = ", ".join(f"{triton_conv.label(k)} {sweep[k]:.1f}" for k in runner_up)
        print(f"{name:<22} {operation:<11} {batch:>5} {cudnn:>6.1f} {triton_conv.label(now_launch):>22} {now_us:>6.1f} "
              f"{triton_conv.label(sweep_launch):>22} {sweep_us:>6.1f}  {following}", flush=True)
        winners.setdefault(operation, set()).add(sweep_launch)
        totals["cudnn"] += cudnn * count
        totals["now"] += min(cudnn, now_us) * count
        totals["sweep"] += min(cudnn, now_us, sweep_us) * count
    print("\none step's convolutions (each operation at its count, the 1-image forward passes included), fastest of:")
    for kind, total in totals.items():
        print(f"  {kind:<6} {total:8.1f} us")
    for operation, chosen in winners.items():
        print(f"winning launches, {operation}: {sorted(chosen)}")


if __name__ == "__main__":
    main()
