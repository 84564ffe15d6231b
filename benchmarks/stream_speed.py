"""Stream speed: frames/s and per-frame latency of `tta stream run`'s loop, on synthetic frames made on the device.

Settings as `tta stream run`'s defaults: explicit + implicit memory, a window of 16 frames, 32-image batches drawn
from it, 1 update per frame, prediction after the update (a CUDA graph on CUDA; --variants picks bf16/fp32 and
torch.compile on/off per run). Models, random weights:
  resnet26  the reference ResNet-26 GN (split after layer2, rotation head) at 32 px   goal >= 1000 frames/s on an H100
  resnet50  a timm ResNet-50 with GroupNorm (32 groups) at 224 px                     goal >= 30 frames/s (live video)
Each row also has a predict-only run (mode none) beside it: the gap is the cost of adapting.

    python benchmarks/stream_speed.py [--frames 2000] [--device cuda] [--models resnet26,resnet50] [--modes explicit,none]
    python benchmarks/stream_speed.py --device cpu --frames 4          # a quick check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

import torch
from conv_sweep import grid

from tta_cli.config import ModelConfig, StreamSettings, TaskConfig
from tta_cli.engine.execution import uses_triton_kernels
from tta_cli.kernels import triton_conv, triton_norm, zeroed_outputs
from tta_cli.models import build_model
from tta_cli.stream.loop import run_stream
from tta_cli.tasks import build_task

MODELS = {
    "resnet26": ("ResNet-26 GN, 32 px", ModelConfig(), 1000.0),
    "resnet50": (
        "timm ResNet-50 GN, 224 px",
        ModelConfig(backbone="timm_resnet", timm_name="resnet50", img_size=224, norm="gn", groups=32, split="layer2"),
        30.0,
    ),
}
CLASSES = 10


def synthetic_frames(count: int, size: int, device: torch.device) -> torch.Tensor:
    """uint8 (count, size, size, 3) noise frames, made on the device so decoding and upload are not measured."""
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, device=device, generator=generator)


def measure(model, task, frames: torch.Tensor, settings: StreamSettings, warmup: int, device: torch.device) -> dict:
    """A short warm-up stream (kernel selection, allocator), then the timed stream; run_stream's own summary, with
    the warm-up's wall seconds (on a fresh machine: the compiles and the convolutions' choice, the cold start)."""
    start = time.perf_counter()
    if warmup:
        run_stream(model, task, enumerate(frames[:warmup]), dataclasses.replace(settings, max_frames=warmup), CLASSES, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    summary = run_stream(model, task, enumerate(frames), settings, CLASSES, device).summary
    summary["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    summary["warmup_s"] = warmup_seconds
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000, help="timed frames per run")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up frames before each timed run (default: min(32, frames/4))")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="resnet26,resnet50", help=f"comma list of: {', '.join(MODELS)}")
    parser.add_argument("--modes", default="explicit,none", help="comma list of stream modes: explicit, implicit, episodic, none")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--copies", type=int, default=32, help="images per update (window draws)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--pre-update", action="store_true", help="predict before each frame's update (lower latency)")
    parser.add_argument("--eager", action="store_true", help="no CUDA graph (to see what the graph saves)")
    parser.add_argument("--profile", type=int, default=0, metavar="FRAMES",
                        help="also print a kernel profile of FRAMES frames of each run (at least two blocks of 64; the first is not "
                        "recorded): kernels and device time per frame, by kind")
    parser.add_argument("--variants", default="fp32:compile,fp32:compile:serial,fp32:compile:torch,bf16:compile",
                        help="comma list of precision:compile|eager[:triton|:torch][:serial][:EXPERIMENT]... "
                        "(bf16/fp32 autocast, torch.compile, the convolutions' kernels: Triton where faster, or "
                        "torch's only, default: the stream's default; serial: each prediction after its frame's update instead of "
                        f"beside the next update; EXPERIMENT: one of {', '.join(EXPERIMENTS)}, see experiments() below)")
    args = parser.parse_args()
    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else max(1, min(32, args.frames // 4))
    task = build_task(TaskConfig(name="rotation"))
    rows = []
    for key in args.models.split(","):
        label, config, goal = MODELS[key]
        torch.manual_seed(0)
        model = build_model(config, task).to(device).eval()
        frames = synthetic_frames(args.frames, config.img_size, device)
        for mode in args.modes.split(","):
            for variant in args.variants.split(","):
                precision, compiled, *layout = variant.split(":")
                settings = StreamSettings(
                    mode=mode,
                    window=args.window,
                    copies=args.copies,
                    steps=args.steps,
                    pre_update=args.pre_update,
                    cuda_graph=not args.eager,
                    amp=precision == "bf16",
                    compile=compiled == "compile",
                    overlap="serial" not in layout,
                    conv_kernels="triton" if "triton" in layout else "torch" if "torch" in layout else StreamSettings.conv_kernels,
                )
                with experiments(layout):
                    summary = measure(model, task, frames, settings, min(warmup, args.frames), device)
                    if args.profile:  # (at least two blocks: the first, which holds the capture, is not recorded)
                        profiled = frames[: max(args.profile, 2 * settings.block)]
                        found = profile_stream(model, task, profiled, settings, device)
                        if not found and settings.cuda_graph and device.type == "cuda":  # the profiler missed the graph's kernels
                            profile_stream(model, task, profiled, dataclasses.replace(settings, cuda_graph=False), device)
                    run = f"{settings.name} {precision} {compiled}"
                    triton = uses_triton_kernels(settings.conv_kernels, device)
                    run += " triton" if triton else ""
                    run += " serial" if settings.adapting and not summary["overlapped_predictions"] else ""  # what ran, not what was asked
                    run += "".join(f" {flag}" for flag in EXPERIMENTS if flag in layout)
                    rows.append((label, run, summary, goal if mode != "none" else None))
                    print(f"{label:<28} {run:<44} {summary['fps']:>10.1f} frames/s (warm-up {summary['warmup_s']:.0f} s)", flush=True)
                    if triton:  # the choices this run made (a run of other candidates starts from none)
                        for shapes, choice in triton_conv.choices().items():
                            print(f"    chose {choice:<14} for {shapes}")
        del model, frames
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, args, device)


EXPERIMENTS = ("grid", "noatomic", "nofuse", "noordered", "nosubpixel", "nozeroed", "nofusednorm", "combo", "nosplit", "cdt")


@contextlib.contextmanager
def experiments(flags):
    """Settings no flag of `tta stream` has, for one run, to measure a change against what it replaced: `grid`, the
    choice tries every launch of benchmarks/conv_sweep.py as well as its own; `noatomic`, none of the atomic
    launches; `nofuse`, no launch of both gradients at once; `noordered`, none of the ordered split sums;
    `nosubpixel`, none of the sub-pixel input gradients; `nozeroed`, each atomic launch zeroes its own output (not
    zeroed with the call's others when it starts, zeroed_outputs.py); `nofusednorm`, the norms stay torch's (inductor's kernels) beside the
    Triton convolutions, not triton_norm's fused GroupNorm + ReLU; `combo`, inductor fuses independent kernels side by
    side (torch._inductor.config.combo_kernels); `nosplit`, inductor keeps each reduction in one kernel
    (split_reductions off: the norms' statistics over 32 images are small grids it may split in two); `cdt`,
    inductor tunes each of its kernels' block sizes by timing them (coordinate_descent_tuning). Every run starts
    from an empty torch.compile cache: dynamo reuses a graph compiled for an earlier run of the same process
    whatever inductor's settings now are (an eighth-session `nosplit` and `cdt` so measured nothing, warm-up 0 s)."""
    candidates = dict(triton_conv.CANDIDATES)
    for operation, (torch_call, triton_call, tiles) in candidates.items():
        tiles = tuple(tiles) + (tuple(grid(operation)) if "grid" in flags and operation != "grads" else ())
        if "noatomic" in flags:
            tiles = tuple(tile for tile in tiles if not getattr(tile, "atomic", False))
        if "nofuse" in flags and operation == "grads":
            tiles = ()
        for flag, field in (("noordered", "ordered"), ("nosubpixel", "subpixel")):
            if flag in flags:
                tiles = tuple(tile for tile in tiles if not getattr(tile, field, False))
        triton_conv.CANDIDATES[operation] = (torch_call, triton_call, tiles)
    changed = bool({"grid", "noatomic", "nofuse", "noordered", "nosubpixel"} & set(flags))
    if changed:
        triton_conv._CHOSEN.clear()
    torch._dynamo.reset()  # (inductor's on-disk cache still serves a run whose settings it has compiled before)
    shared_zeros, swap_norms = zeroed_outputs.zeros, triton_norm.use_triton_norms
    if "nofusednorm" in flags:
        triton_norm.use_triton_norms = lambda module: 0
    if "nozeroed" in flags:
        zeroed_outputs.zeros = lambda role, shape, device, dtype: torch.zeros(shape, device=device, dtype=dtype)
    try:
        with torch._inductor.config.patch(
            combo_kernels="combo" in flags, split_reductions="nosplit" not in flags, coordinate_descent_tuning="cdt" in flags
        ):
            yield
    finally:
        zeroed_outputs.zeros, triton_norm.use_triton_norms = shared_zeros, swap_norms
        triton_conv.CANDIDATES.update(candidates)
        if changed:
            triton_conv._CHOSEN.clear()


KINDS = (  # kernel kind by name: first match wins (inductor's before cuDNN's: its names can hold "conv2d")
    ("conv, Triton (tta)", ("forward_kernel", "input_grad_kernel", "weight_grad_kernel", "grads_kernel", "input_grad_subpixel_kernel")),
    ("GroupNorm + ReLU, Triton (tta)", ("group_norm_relu",)),
    ("layout transposes (cuDNN)", ("nchwToNhwc", "nhwcToNchw")),
    ("fused by inductor", ("triton_",)),
    ("conv, cuDNN", ("conv", "cudnn", "xmma", "implicit_gemm", "dgrad", "wgrad", "fprop", "cutlass", "gemm", "sm90_", "sm80_")),
    ("copies, fills", ("Memcpy", "Memset", "copy_kernel", "fill_kernel", "FillFunctor")),
)


def kernel_kind(name: str) -> str:
    for kind, needles in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "other (eager aten)"


def profile_stream(model, task, frames: torch.Tensor, settings: StreamSettings, device: torch.device) -> int:
    """Device kernels of the stream loop (its CUDA graph too: CUPTI records graph kernels) over whole blocks of
    frames after the first (which holds the graph capture), grouped by kind: count and device time per frame;
    then the costliest kernels by name. Returns how many kernels it saw."""
    from torch.profiler import ProfilerActivity, profile, schedule

    block = settings.block
    blocks = max(1, len(frames) // block - 1)
    settings = dataclasses.replace(settings, view_every=1e9, max_frames=block * (blocks + 1))
    traces = []  # the recorded blocks' events, handed over when the recording ends
    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=0, warmup=1, active=blocks, repeat=1),
        on_trace_ready=lambda done: traces.append(list(done.events())),
    ) as trace:
        run_stream(model, task, enumerate(frames), settings, CLASSES, device, on_progress=lambda _: trace.step())
    count = block * blocks
    events = [  # device kernels, not the profiler's own per-step span on the device timeline
        e for e in (traces[0] if traces else []) if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("ProfilerStep")
    ]
    kinds: dict[str, list[float]] = {}
    names: dict[str, list[float]] = {}
    for event in events:
        duration = getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0)
        kinds.setdefault(kernel_kind(event.name), []).append(duration)
        names.setdefault(event.name, []).append(duration)
    busy = sum(sum(v) for v in kinds.values()) / count
    graph = "CUDA graph" if settings.cuda_graph and device.type == "cuda" else "no graph"
    print(f"\n  profile, {settings.name}, {graph}, {count} frames: {len(events) / count:.0f} kernels and {busy:.0f} us device time per frame")
    print(f"  {'kind':<28} {'kernels/frame':>14} {'us/frame':>9} {'us/kernel':>10}")
    for kind, durations in sorted(kinds.items(), key=lambda item: -sum(item[1])):
        print(f"  {kind:<28} {len(durations) / count:>14.1f} {sum(durations) / count:>9.1f} {sum(durations) / len(durations):>10.2f}")
    print(f"  {'costliest kernels':<90} {'per frame':>9} {'us/frame':>9}")
    for name, durations in sorted(names.items(), key=lambda item: -sum(item[1]))[:25]:
        print(f"  {name[:90]:<90} {len(durations) / count:>9.1f} {sum(durations) / count:>9.1f}")
    return len(events)


def print_table(rows, args, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"\nstream speed on {name}, torch {torch.__version__}: window {args.window}, copies {args.copies}, "
        f"{args.steps} step(s) per frame, {'predict before' if args.pre_update else 'predict after'} the update, "
        f"{'eager' if args.eager else 'CUDA graph where available'}, {args.frames} frames"
    )
    print(f"{'model':<28} {'run':<44} {'frames/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'peak GiB':>9} {'goal':>12}")
    for label, run, summary, goal in rows:
        latency = summary["latency_ms"]
        verdict = "" if goal is None or device.type != "cuda" else f">= {goal:g} {'ok' if summary['fps'] >= goal else 'MISSED'}"
        numbers = f"{summary['fps']:>10.1f} {latency['p50']:>8.2f} {latency['p95']:>8.2f} {summary['peak_gib']:>9.2f}"
        print(f"{label:<28} {run:<44} {numbers} {verdict:>12}")


if __name__ == "__main__":
    main()
