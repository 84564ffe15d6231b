"""Corruption throughput: every corruption x severity 1-5 on the CIFAR-10 test split (or random
uint8 images), one corrupt() call per (corruption, severity) as `tta corrupt` makes them.

Prints images/s per corruption and the total (goal on an H100: the 15 x 5 on 10,000 images, i.e.
750,000 images, within 60 s). Usage:
    python benchmarks/corrupt_speed.py [--archive cifar10-jpeg.tar.gz] [--device cuda] [--n 10000]
        [--corruptions all|extra|names] [--severities 1,2,3,4,5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

from tta_cli.corrupt import corrupt, resolve_corruptions
from tta_cli.device import resolve_device


def load_images(archive: str | None, count: int) -> torch.Tensor:
    """uint8 (N, 32, 32, 3): the archive's test split, or random pixels."""
    if archive:
        from tta_cli.data.sources import load_split

        return load_split(archive, "test").images[:count]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", help="class-folder tree or .tar.gz whose test split is corrupted (else random images)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=10_000, help="images per (corruption, severity)")
    parser.add_argument("--corruptions", default="all")
    parser.add_argument("--severities", default="1,2,3,4,5")
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    names = resolve_corruptions(args.corruptions)
    severities = [int(s) for s in args.severities.split(",")]
    images = load_images(args.archive, args.n).to(device)
    console = Console()
    console.print(f"{len(names)} corruptions x severities {severities} on {images.shape[0]} images {tuple(images.shape[1:])}, {device}")

    for name in names:  # warm-up: kernels, caches, frost assets, zoom operators
        for severity in severities:
            corrupt(images[:64], name, severity, seed=1)
    sync(device)

    seconds: dict[str, float] = {}
    for name in names:
        sync(device)
        started = time.perf_counter()
        for severity in severities:
            corrupt(images, name, severity, seed=0)
        sync(device)
        seconds[name] = time.perf_counter() - started

    per_corruption = images.shape[0] * len(severities)
    table = Table(title=f"corrupt() throughput on {device}")
    for column in ("corruption", "images", "seconds", "images/s"):
        table.add_column(column, justify="left" if column == "corruption" else "right")
    for name in names:
        table.add_row(name, str(per_corruption), f"{seconds[name]:.2f}", f"{per_corruption / seconds[name]:,.0f}")
    total = sum(seconds.values())
    table.add_row("total", str(per_corruption * len(names)), f"{total:.2f}", f"{per_corruption * len(names) / total:,.0f}")
    console.print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": str(device), "images": int(images.shape[0]), "severities": severities, "seconds": seconds, "total": total},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
