"""Adaptation speed on the reference network (ResNet-26 GN, split after layer2, rotation), in one run:

- reference-episodic / reference-online: a faithful copy of the paper's loop (one sample at a time,
  32 copies augmented with PIL/torchvision transforms on the CPU, rotation on the GPU, torch.optim.SGD,
  weights restored with load_state_dict after each sample in the episodic case);
- tta's paths: batched episodic TTT (vmap over per-sample weights; fp32/bf16, eager/torch.compile, chunk
  sizes) and online TTT (eager, CUDA graph, CUDA graph over torch.compile'd forward passes, rollback).

Prints samples/s, peak GPU memory and the seconds of the first (compiling, capturing) calls per path, and
how far the compiled online step's logits are from the eager one's.  Usage:
    python benchmarks/adapt_speed.py [--ckpt DIR] [--episodic-samples 2048] [--online-samples 4000]
    python benchmarks/adapt_speed.py --device cpu --episodic-samples 8 --online-samples 8 --reference-samples 1 \\
        --episodic fp32:eager:8 --online fp32:eager:eager       # a quick check that it runs
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback

import torch

from tta_cli.adapt.methods.ttt_online import OnlineTTT
from tta_cli.adapt.online import OnlineConfig
from tta_cli.adapt.policies import RollbackPolicy
from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.engine.episodic import EpisodicConfig, EpisodicTTT
from tta_cli.engine.parallel_online import ParallelOnlineTTT
from tta_cli.models import build_model
from tta_cli.tasks import build_task


def reference_model(ckpt: str | None, device):
    if ckpt:
        from tta_cli.train.checkpoint import load_model

        model, config, _ = load_model(ckpt, device)
        return model, build_task(config.task)
    task = build_task(TaskConfig(name="rotation"))
    return build_model(ModelConfig(), task).to(device), task


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_loop(model, task, images_uint8, steps, copies, lr, episodic, device) -> float:
    """The paper's per-sample loop with CPU PIL augmentation; returns samples/s."""
    import torchvision.transforms as T
    from PIL import Image

    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    model = copy.deepcopy(model).eval()
    names = [n for n, _ in model.encoder.named_parameters()]
    state = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if n.startswith("encoder.")], lr=lr)
    assert names
    sync(device)
    started = time.perf_counter()
    for image in images_uint8:
        if episodic:
            model.load_state_dict(state)
        pil = Image.fromarray(image.numpy())
        for _ in range(steps):
            batch = torch.stack([augment(pil) for _ in range(copies)]).to(device)
            inputs, targets = task.make_batch(batch, mode="adapt")
            optimizer.zero_grad()
            task.loss(model(inputs, head="ssl"), targets).backward()
            optimizer.step()
        with torch.no_grad():
            model(torch.from_numpy(image.numpy()).permute(2, 0, 1)[None].float().div(255).to(device)).argmax(1).item()
    sync(device)
    return len(images_uint8) / (time.perf_counter() - started)


def timed(method, images, batch) -> tuple[float, float]:
    device = images.device
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for part in images.split(batch):
        method.adapt(part)
    sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return len(images) / seconds, peak


def warm_up(method, images, batch) -> float:
    """Seconds of the first calls (compilation, graph capture, kernel selection), which the rates leave out."""
    sync(images.device)
    started = time.perf_counter()
    for part in images.split(batch):
        method.adapt(part)
    sync(images.device)
    return time.perf_counter() - started


def parse_variants(text: str) -> list[tuple[str, bool, str]]:
    """"fp32:eager:auto,bf16:compile:256" -> [(precision, compiled, chunk-or-graph), ...]; "" -> none."""
    variants = []
    for item in filter(None, text.split(",")):
        precision, mode, extra = (item.split(":") + ["", ""])[:3]
        variants.append((precision, mode == "compile", extra))
    return variants


def episodic_rows(model, task, images, args, device) -> list[tuple]:
    rows = []
    for precision, compiled, chunk in parse_variants(args.episodic):
        # "512-grouped": per-sample weights folded into grouped convolutions; "-bench": cuDNN's autotuner
        chunk, *flags = chunk.split("-")
        config = EpisodicConfig(
            steps=10, copies=32, amp=precision == "bf16", compile=compiled, chunk=None if chunk == "auto" else int(chunk),
            per_sample="grouped" if "grouped" in flags else "vmap",
        )
        torch.backends.cudnn.benchmark = "bench" in flags  # process-wide: set per variant
        method = EpisodicTTT(copy.deepcopy(model), task, config, torch.Generator(device=device).manual_seed(0))
        label = f"tta episodic {config.per_sample} {precision} {'compiled' if compiled else 'eager'}"
        label += " + cudnn.benchmark" if "bench" in flags else ""
        try:
            first = warm_up(method, images[: (method._chunk or 64)], 4096)  # also sizes the automatic chunk
            rate, peak = timed(method, images[: args.episodic_samples], 4096)
            rows.append((f"{label} chunk {method._chunk}", rate, peak, first))
        except torch.OutOfMemoryError:
            rows.append((f"{label} chunk {chunk}", float("nan"), float("inf"), float("nan")))
            torch.cuda.empty_cache()
        except Exception:  # one broken variant must not cost the device call the others' numbers
            traceback.print_exc()
            rows.append((f"{label} chunk {chunk} FAILED", float("nan"), float("nan"), float("nan")))
        print(rows[-1], flush=True)
        del method
    torch.backends.cudnn.benchmark = False
    return rows


def online_method(model, task, precision, compiled, graph, rollback=False, pipeline=False, autotune=False, triton=False):
    config = OnlineConfig(
        steps=1, copies=32, amp=precision == "bf16", cuda_graph=graph, compile=compiled, pipeline=pipeline,
        conv_kernels="triton" if triton else "torch",
    )
    torch.backends.cudnn.benchmark = autotune  # process-wide; online_rows clears it after each variant
    config.rollback = RollbackPolicy(enabled=rollback)
    generator = None if graph else torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    return OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=generator)


class _Sequence:
    """`adapt` through `adapt_sequence`, so `timed` and `warm_up` can drive the pipelined online path."""

    def __init__(self, method):
        self.method = method

    def adapt(self, images):
        return self.method.adapt_sequence(images)


def online_rows(model, task, images, args, device) -> list[tuple]:
    rows = []
    for precision, compiled, extra in parse_variants(args.online):
        flags = extra.split("-")
        graph, rollback = "eager" not in flags, "rollback" in flags
        autotune, pipeline, triton = "bench" in flags, "pipe" in flags, "triton" in flags
        method = online_method(model, task, precision, compiled, graph and device.type == "cuda", rollback, pipeline, autotune, triton)
        count = args.online_samples if graph else min(args.online_samples, 500)
        if pipeline:  # adapt_sequence: predictions folded into the next update's forward pass
            first = warm_up(_Sequence(method), images[:20], 10)
            rate, peak = timed(_Sequence(method), images[:count], 1000)
        else:
            first = warm_up(method, images[:20], 1)
            rate, peak = timed(method, images[:count], 1)
        label = f"tta online {'graph' if graph else 'eager'} {precision} {'compiled' if compiled else 'eager'}"
        label += " + rollback" if rollback else ""
        label += " + cudnn.benchmark" if autotune else ""
        label += " + pipeline" if pipeline else ""
        label += " + triton convs" if triton else ""
        rows.append((label, rate, peak, first))
        torch.backends.cudnn.benchmark = False  # the setting is process-wide: the next variant starts without it
        print(rows[-1], flush=True)
    return rows


def parallel_rows(model, task, images_uint8, args, device) -> list[tuple]:
    """Online TTT over independent streams side by side (as `tta adapt` runs the per-corruption order)."""
    rows = []
    for precision, compiled, streams in parse_variants(args.parallel):
        streams, _, how = streams.partition("-")  # "15g-grouped": per-stream weights folded into grouped convolutions
        graph = streams.endswith("g") and device.type == "cuda"  # "15g": 15 streams, each position's step a CUDA graph
        streams = int(streams.rstrip("g"))
        config = OnlineConfig(steps=1, copies=32, amp=precision == "bf16", compile=compiled, cuda_graph=graph, per_sample=how or "vmap")
        label = f"tta online, {streams} streams side by side, {config.per_sample} {precision}"
        label += f" {'compiled' if compiled else 'eager'}{' graph' if graph else ''}"
        try:
            rows.append((label, *parallel_rate(ParallelOnlineTTT(copy.deepcopy(model), task, config), images_uint8, streams, args, device)))
        except Exception:  # one broken variant must not cost the device call the others' numbers
            traceback.print_exc()
            rows.append((f"{label} FAILED", float("nan"), float("nan"), float("nan")))
        print(rows[-1], flush=True)
    return rows


def parallel_rate(method, images_uint8, streams: int, args, device) -> tuple[float, float, float]:
    """(samples/s, peak GiB, seconds of the compiling first call) of `streams` streams side by side."""
    length = max(args.online_samples // streams, 1)
    indices = torch.arange(streams * length, device=device).remainder(len(images_uint8)).view(streams, length)
    started = time.perf_counter()
    method.adapt_streams(images_uint8, list(indices[:, :4]))  # compiles for this number of streams
    sync(device)
    first = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    method.adapt_streams(images_uint8, list(indices))
    sync(device)
    rate = streams * length / (time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return rate, peak, first


def profile_online(model, task, images, device) -> None:
    """Kernels of one compiled fp32 online step (no graph, so each kernel shows): count and device time per step."""
    from torch.profiler import ProfilerActivity, profile

    method = online_method(model, task, "fp32", True, graph=False)
    for image in images[:30]:
        method.adapt(image[None])
    sync(device)
    steps = 50
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        for image in images[30 : 30 + steps]:
            method.adapt(image[None])
        sync(device)
    print_profile(trace, steps, "the compiled fp32 online step (no graph)", "step")


def print_profile(trace, count: int, what: str, unit: str) -> None:
    """Kernel count and device time per `unit` (count of them in the trace), then the costliest kernels."""
    events = [e for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time if hasattr(e, "device_time") else e.cuda_time for e in events) / 1000.0 / count
    print(f"\nprofile of {what}: {len(events) / count:.0f} kernels and {busy_ms:.3f} ms device time per {unit}")
    keys = ("self_device_time_total", "self_cuda_time_total") if events else ("self_cpu_time_total",)  # names differ across releases
    for key in keys:
        try:
            print(trace.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=70))
            break
        except (KeyError, AttributeError, ValueError):
            continue


def profile_episodic(model, task, images, chunk: int, device, per_sample: str = "vmap") -> None:
    """Kernels of the episodic path (bf16, compiled on CUDA) on one warm chunk of `chunk` samples x 10 steps:
    where the per-sample (grouped) convolutions spend the time, before choosing a kernel to replace."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    config = EpisodicConfig(steps=10, copies=32, amp=on_gpu, compile=on_gpu, chunk=chunk, per_sample=per_sample)
    method = EpisodicTTT(copy.deepcopy(model), task, config, torch.Generator(device=device).manual_seed(0))
    method.adapt(images[:chunk])  # compiles
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]) as trace:
        method.adapt(images[chunk : 2 * chunk])
        sync(device)
    print_profile(trace, chunk * config.steps, f"the episodic path, chunk {chunk}", "sample-step")


def online_parity(model, task, images, device) -> str:
    """|logit difference| between the compiled and the eager online step on the same 64-sample stream (fp32, same
    random views), after the first sample (one update: rounding only, ~1e-5) and after all 64 (sequential updates
    amplify rounding: on the CPU, eager fp32 against fp64 drifts to ~0.4 over 64 noise images, so that is the scale
    of agreement to expect there)."""
    logits = []
    for compiled in (False, True):
        if device.type == "cuda":
            torch.cuda.manual_seed(0)
        method = online_method(model, task, "fp32", compiled, device.type == "cuda")
        logits.append(torch.cat([method.adapt(image[None]) for image in images[:64]]))
    difference = (logits[0] - logits[1]).abs()
    agree = (logits[0].argmax(1) == logits[1].argmax(1)).float().mean().item()
    return (
        f"online compiled vs eager (fp32, same views): max |diff| {difference[0].max().item():.2e} after 1 sample, "
        f"{difference.max().item():.2e} over 64 (max |logit| {logits[0].abs().max().item():.2f}); same class {agree:.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--episodic-samples", type=int, default=2048)
    parser.add_argument("--online-samples", type=int, default=4000)
    parser.add_argument("--reference-samples", type=int, default=10)
    parser.add_argument("--episodic", default="bf16:compile:auto,fp32:compile:auto,bf16:eager:auto",
                        help="precision:eager|compile:chunk[-grouped][-bench] (chunk auto = tta's default: 512 clipped to free memory; "
                        "-grouped: engine/grouped.py; -bench: cudnn.benchmark)")
    parser.add_argument("--online", default="fp32:eager:graph,fp32:compile:graph,fp32:compile:graph-pipe,fp32:compile:graph-pipe-triton,"
                        "fp32:compile:graph-rollback",
                        help="precision:eager|compile:graph|eager[-rollback][-bench][-pipe][-triton]; bench: cudnn.benchmark")
    parser.add_argument("--parallel", default="fp32:compile:15g,bf16:compile:15g",
                        help="precision:eager|compile:streams[-grouped], streams ending in g = CUDA graph per position")
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of the compiled online step")
    parser.add_argument("--profile-episodic", type=int, default=0, metavar="CHUNK",
                        help="print a kernel profile of one episodic chunk of CHUNK samples (needs 2 x CHUNK samples)")
    parser.add_argument("--profile-per-sample", default="vmap", choices=["vmap", "grouped"], help="which per-sample path --profile-episodic profiles")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, task = reference_model(args.ckpt, device)
    generator = torch.Generator().manual_seed(0)
    images_uint8 = torch.randint(0, 256, (max(args.episodic_samples, args.online_samples), 32, 32, 3), generator=generator, dtype=torch.uint8)
    images = images_uint8.to(device).permute(0, 3, 1, 2).float().div(255)
    rows = []
    if args.reference_samples:
        episodic = reference_loop(model, task, images_uint8[: args.reference_samples], 10, 32, 1e-3, True, device)
        online = reference_loop(model, task, images_uint8[: args.reference_samples * 5], 1, 32, 1e-3, False, device)
        rows.append(("reference episodic (10x32, PIL aug)", episodic, float("nan"), float("nan")))
        rows.append(("reference online (1x32, PIL aug)", online, float("nan"), float("nan")))
        print(rows, flush=True)
    if args.profile:
        profile_online(model, task, images, device)
    if args.profile_episodic:
        try:
            profile_episodic(model, task, images, args.profile_episodic, device, args.profile_per_sample)
        except Exception:  # the rates below still come back
            traceback.print_exc()
    parity = online_parity(model, task, images, device)
    print(parity, flush=True)
    rows += online_rows(model, task, images, args, device)
    if args.parallel:
        rows += parallel_rows(model, task, images_uint8.to(device), args, device)
    if args.episodic:
        rows += episodic_rows(model, task, images, args, device)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\nadapt speed on {name}, torch {torch.__version__} (ResNet-26 GN, split layer2, rotation, 32 copies; episodic 10 steps, online 1)")
    print(parity)
    print(f"{'path':<52} {'samples/s':>10} {'peak GiB':>9} {'first calls s':>14}")
    for label, rate, peak, first in rows:
        print(f"{label:<52} {rate:>10.1f} {peak:>9.2f} {first:>14.1f}")


if __name__ == "__main__":
    main()
