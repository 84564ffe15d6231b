"""Multi-GPU scaling: `tta train` images/s (DistributedDataParallel) and episodic TTT samples/s (samples
sharded over ranks) on 1, 2, 4 GPUs, each count launched through torchrun; prints speed-up vs 1 GPU.

    python benchmarks/scaling.py                        # 1,2,4 GPUs, the fast Sun 2020 recipe, synthetic data
    python benchmarks/scaling.py --gpus 1,2 --batch-size 1024 --adapt-samples 8192 --json runs/scaling.json
    python benchmarks/scaling.py --cpu --gpus 1,2 --recipe recipes/quickstart.yaml --train-images 512 --adapt-samples 32 --steps 1

Training runs the real loop on random uint8 images (the speed does not depend on the pixels): the first
epoch warms up (torch.compile, cuDNN), the later ones are timed; the global batch stays the recipe's
(strong scaling) unless --batch-size says otherwise. Episodic TTT adapts --adapt-samples random images
with the trained weights after one untimed warm-up chunk; the time covers gathering the predictions.
--cpu runs the same code in CPU processes (gloo) as a smoke test: its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

GOALS = {2: 1.8, 4: 3.5}  # speed-up wanted over 1 GPU (issue 6)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4", help="comma-separated GPU (process) counts to measure (default 1,2,4)")
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes" / "sun2020-rotation-gn-fast.yaml"),
                        help="training recipe: model, task, optimizer (default: the fast Sun 2020 ResNet-26 recipe)")
    parser.add_argument("--train-images", type=int, default=50_000, help="synthetic 32x32 training images (default 50000)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs; all but the first are timed (default 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the recipe's)")
    parser.add_argument("--adapt-samples", type=int, default=4096, help="images adapted by episodic TTT (default 4096)")
    parser.add_argument("--steps", type=int, default=10, help="TTT steps per sample (default 10)")
    parser.add_argument("--copies", type=int, default=32, help="augmented views per sample (default 32)")
    parser.add_argument("--chunk", type=int, default=256,
                        help="samples adapted at once, dealt to ranks in turn (default 256: 4096 samples split evenly; 0: fill GPU memory)")
    parser.add_argument("--cpu", action="store_true", help="smoke test: CPU processes with gloo instead of GPUs")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # set by the launcher: the result file
    return parser.parse_args(argv)


def synthetic_set(count: int, seed: int):
    from tta_cli.data.imageset import ImageSet

    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return ImageSet(images, labels, [f"class{c}" for c in range(10)], {"corruption": "synthetic", "severity": 0})


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: train, then adapt; rank 0 writes the numbers to args.worker."""
    from tta_cli import distributed
    from tta_cli.adapt.methods import build_method
    from tta_cli.adapt.orders import build_order
    from tta_cli.adapt.runner import run_method
    from tta_cli.config import AdaptSettings, TrainConfig, load_config
    from tta_cli.tasks import build_task
    from tta_cli.train.checkpoint import load_model
    from tta_cli.train.loop import train

    device = distributed.init(torch.device("cpu" if args.cpu else "cuda"))
    if args.cpu:
        torch.set_num_threads(1)
    out = args.worker.parent / "train"
    optim = {"epochs": args.epochs} | ({"batch_size": args.batch_size} if args.batch_size else {})
    config = load_config(TrainConfig, args.recipe, {"out": str(out), "device": device.type, "eval_every": 0, "optim": optim})
    if args.cpu:
        config.compile = False
    result = train(config, synthetic_set(args.train_images, 0), synthetic_set(256, 1), device, force=True)
    timed_epochs = result.history[1:] if len(result.history) > 1 else result.history
    timed_seconds = result.history[-1]["seconds"] - (result.history[0]["seconds"] if len(result.history) > 1 else 0.0)
    images_per_epoch = args.train_images // config.optim.batch_size * config.optim.batch_size
    train_rate = len(timed_epochs) * images_per_epoch / timed_seconds

    model, train_config, meta = load_model(out, device)
    task = build_task(train_config.task)
    settings = AdaptSettings(methods=["ttt"], steps=args.steps, copies=args.copies, chunk=args.chunk or None)
    method = build_method("ttt", model, task, settings, len(meta["class_names"]), device)
    adapt_set = synthetic_set(args.adapt_samples, 2)
    warm_up = adapt_set.subset(slice(0, (args.chunk or 8) * distributed.world_size()))
    run_method(method, [warm_up], build_order([warm_up], "per-corruption"), device)
    run = run_method(method, [adapt_set], build_order([adapt_set], "per-corruption"), device)
    if distributed.is_main():
        numbers = {
            "processes": distributed.world_size(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "train_images_per_s": train_rate,
            "global_batch": config.optim.batch_size,
            "episodic_samples_per_s": run.samples / run.seconds,
            "chunk": method.episodes._chunk,
        }
        args.worker.write_text(json.dumps(numbers))
    distributed.shutdown()


def launch(args: argparse.Namespace, argv: list[str], count: int, folder: Path) -> dict:
    """Run this script as `count` torchrun workers and read rank 0's numbers."""
    result = folder / f"{count}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(count),
               __file__, "--", *argv, "--worker", str(result)]  # after `--` torchrun reads no option of ours
    environment = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    completed = subprocess.run(command, env=environment)
    if completed.returncode != 0 or not result.is_file():
        fail(f"the run on {count} {'processes' if args.cpu else 'GPUs'} failed (torchrun exit code {completed.returncode})")
    return json.loads(result.read_text())


def fail(message: str) -> None:
    print(f"scaling.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def print_table(rows: list[dict], cpu: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    base = rows[0]
    unit = "processes" if cpu else "GPUs"
    table = Table(title=f"tta scaling on {base['device']}" + (" (CPU smoke test: timings mean nothing)" if cpu else ""))
    for column in (unit, "train images/s", "speed-up", "episodic samples/s", "speed-up", "goal"):
        table.add_column(column, justify="right")
    for row in rows:
        train_speedup = row["train_images_per_s"] / base["train_images_per_s"]
        adapt_speedup = row["episodic_samples_per_s"] / base["episodic_samples_per_s"]
        goal = GOALS.get(row["processes"]) if base["processes"] == 1 else None
        table.add_row(str(row["processes"]), f"{row['train_images_per_s']:,.0f}", f"{train_speedup:.2f}x",
                      f"{row['episodic_samples_per_s']:,.1f}", f"{adapt_speedup:.2f}x", f">= {goal}x" if goal else "")
    Console().print(table)
    print(f"global batch {base['global_batch']}, episodic chunk {base['chunk']}")


def main() -> None:
    argv = sys.argv[1:]
    if "--" in argv:  # torchrun passes our arguments after its own `--`
        argv = [a for a in argv if a != "--"]
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return
    counts = sorted({int(c) for c in args.gpus.split(",") if c.strip()})
    if not counts or counts[0] < 1:
        fail(f"--gpus wants positive counts like 1,2,4, got {args.gpus!r}")
    available = (os.cpu_count() or 1) if args.cpu else torch.cuda.device_count()
    if counts[-1] > available:
        kind = "CPU cores" if args.cpu else "CUDA GPUs"
        fewer = f"pass --gpus with counts up to {available}" if available else "--cpu runs a smoke test"
        asked = f"{counts[-1]} {'processes' if args.cpu else 'GPUs'}"
        fail(f"asked for up to {asked} (--gpus {args.gpus}), but this machine has {available} {kind}; "
             f"run it where {counts[-1]} are, or {fewer}")
    with tempfile.TemporaryDirectory(prefix="tta-scaling-") as folder:
        rows = [launch(args, argv, count, Path(folder)) for count in counts]
    print_table(rows, args.cpu)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
