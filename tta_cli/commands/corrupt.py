"""`tta corrupt`: write CIFAR-10-C style corrupted copies of a clean test split (official .npy layout)."""

from __future__ import annotations

import inspect
import time
import zlib
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tta_cli.commands.common import DataOpt, DataRootOpt, DeviceOpt, ForceOpt, OutOpt, SeedOpt, console, user_errors
from tta_cli.data.imageset import mix_classes
from tta_cli.device import resolve_device
from tta_cli.errors import TTAError
from tta_cli.files import atomic_write, write_json

DEFAULT_SOURCE = "cifar10-mini"
CHUNK_IMAGES = 10_000  # images per corrupt() call: bounds device memory
PREVIEW_IMAGES = 3

EXAMPLES = """
Examples:

  tta corrupt --out data/cifar10_c

  tta corrupt --data ../shared/data/cifar10-jpeg.tar.gz --out data/cifar10_c --device cuda

  tta corrupt --corruptions gaussian_noise,fog --n 500 --out /tmp/c --preview /tmp/c/preview.png

  tta corrupt --corruptions extra --severities 5 --out data/cifar10_c_extra
"""


def register(app: typer.Typer) -> None:
    app.command("corrupt", help=inspect.cleandoc(corrupt_command.__doc__ or "") + "\n" + EXAMPLES)(user_errors(corrupt_command))


def corrupt_command(
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    out: OutOpt = None,
    corruptions: Annotated[
        str,
        typer.Option(
            "--corruptions",
            help="Comma list of names, `all` (the 15 benchmark corruptions) or `extra` (speckle_noise, gaussian_blur, spatter, saturate).",
        ),
    ] = "all",
    severities: Annotated[
        str,
        typer.Option(
            "--severities",
            help="Severities (comma list of 1..5) drawn in --preview and listed in meta.json; the .npy files always hold all five, "
            "in the official layout other toolkits read.",
        ),
    ] = "1,2,3,4,5",
    n: Annotated[int | None, typer.Option("--n", help="Corrupt only n test images (the data layer's class-balanced subset).")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    preview: Annotated[
        Path | None, typer.Option("--preview", help="Also write a PNG grid: corruptions x severities, a few images each.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Make CIFAR-10-C style sets: the 15 corruptions (+4 extras) x 5 severities of a clean test split.

    Corrupts the clean test split of --data with the CIFAR-10-C corruptions (Hendrycks & Dietterich 2019)
    and writes <out>/<corruption>.npy (uint8 (5N, H, W, 3), severities 1..5 stacked), <out>/labels.npy (the N
    labels tiled 5 times, uint8 like the official set) and <out>/meta.json: the official CIFAR-10-C layout,
    which `tta adapt --data <out>` and other toolkits read. The folder appears whole at the end, with a
    manifest.json that `tta adapt` checks; an existing --out is replaced only with --force."""
    from tta_cli.corrupt import SEVERITIES, resolve_corruptions
    from tta_cli.data.sources import load_split
    from tta_cli.outputs import check_out_file, check_out_folder, check_space, staged_folder
    from tta_cli.validation import check_seed

    if out is None:
        raise TTAError("tta corrupt needs --out DIR: the folder that receives <corruption>.npy, labels.npy and meta.json")
    check_out_folder(out, force)
    check_out_file(preview, force, "--preview")
    check_seed(seed)
    names = resolve_corruptions(corruptions)
    shown_severities = parse_severities(severities)
    seed = 0 if seed is None else seed
    torch_device = resolve_device(device or "auto")
    source = data or DEFAULT_SOURCE
    with console.status(f"loading the {source} test split ..."):
        clean = load_split(source, "test", root=data_root, limit=n, seed=seed)
    clean, order = mix_classes(clean, seed)
    count = len(clean)
    console.print(
        f"[bold]tta corrupt[/] {len(names)} corruption(s) x 5 severities on {count} {source} test images, {torch_device} -> {out}"
    )
    if shown_severities != list(SEVERITIES):
        console.print("note: the .npy files hold all five severities (official layout); --severities picks the preview columns")

    check_space(out, len(names) * len(SEVERITIES) * clean.images[0].numel() * count)
    with staged_folder(out, "tta corrupt") as folder:
        samples, seconds = write_sets(folder, clean, names, shown_severities, seed, torch_device, source, order)
    if preview is not None:
        write_preview(preview, clean.images[:PREVIEW_IMAGES].numpy(), samples, shown_severities)
        console.print(f"preview: {preview}")
    print_summary(names, seconds, count * len(SEVERITIES))


def write_sets(out: Path, clean, names: list[str], shown_severities: list[int], seed: int, torch_device, source: str, order):
    """labels.npy, one <corruption>.npy per name and meta.json into `out`; returns preview samples and seconds."""
    from tta_cli.corrupt import SEVERITIES

    count = len(clean)
    labels = clean.labels.numpy()
    label_dtype = np.uint8 if len(clean.class_names) <= 256 else np.int64
    atomic_write(out / "labels.npy", lambda tmp: save_npy(tmp, np.tile(labels.astype(label_dtype), len(SEVERITIES))))

    samples: dict[str, dict[int, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    progress = Progress(
        TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True
    )
    with progress:
        task = progress.add_task("corrupting", total=len(names))
        for name in names:
            progress.update(task, description=name)
            start = time.perf_counter()
            blocks = [corrupt_all(clean.images, name, severity, seed, torch_device) for severity in SEVERITIES]
            seconds[name] = time.perf_counter() - start
            samples[name] = {severity: blocks[severity - 1][:PREVIEW_IMAGES] for severity in shown_severities}
            stacked = np.concatenate(blocks)  # (5N, H, W, 3)
            atomic_write(out / f"{name}.npy", lambda tmp, stacked=stacked: save_npy(tmp, stacked))
            progress.advance(task)

    write_json(
        out / "meta.json",
        {
            "tool": "tta corrupt",
            "source": source,
            "images": count,
            "image_shape": list(clean.images.shape[1:]),
            "seed": seed,
            "device": str(torch_device),
            "corruptions": names,
            "severities": list(SEVERITIES),
            "preview_severities": shown_severities,
            "layout": "<corruption>.npy uint8 (5N, H, W, 3): rows (s-1)*N .. s*N-1 hold severity s; labels.npy (5N,) tiled",
            "class_names": clean.class_names,
            "source_order": order,
            "seconds": seconds,
            "images_per_second": {name: len(SEVERITIES) * count / max(secs, 1e-9) for name, secs in seconds.items()},
        },
    )
    return samples, seconds


def corrupt_all(images: torch.Tensor, name: str, severity: int, seed: int, device: torch.device) -> np.ndarray:
    """Corrupt images (N, H, W, 3) in chunks on `device`; returns uint8 numpy (N, H, W, 3)."""
    from tta_cli.corrupt import corrupt

    chunks = []
    for index, start in enumerate(range(0, images.shape[0], CHUNK_IMAGES)):
        chunk = images[start : start + CHUNK_IMAGES].to(device, non_blocking=True)
        chunks.append(corrupt(chunk, name, severity, seed=block_seed(seed, severity, index)).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, *images.shape[1:]), dtype=np.uint8)


def block_seed(seed: int, severity: int, chunk_index: int) -> int:
    """Seed for one severity block / chunk: independent noise per severity and chunk, like the
    original generator's running numpy RNG, yet reproducible from --seed."""
    return zlib.crc32(f"{seed}:severity{severity}:chunk{chunk_index}".encode())


def parse_severities(text: str) -> list[int]:
    """Parse "1,3,5" into [1, 3, 5]; anything outside 1..5 is a user error."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or any(value not in range(1, 6) for value in values):
        raise TTAError(f"--severities takes a comma list of 1..5 (e.g. 1,2,3,4,5 or 5); got {text!r}")
    return values


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to an exact path (np.save on a name would append .npy to the temp file)."""
    with open(path, "wb") as handle:
        np.save(handle, array)


def write_preview(path: Path, clean: np.ndarray, samples: dict[str, dict[int, np.ndarray]], severities: list[int]) -> None:
    """PNG grid: one row per corruption, a clean column then one column per severity, each cell a strip of images."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(samples)
    columns = 1 + len(severities)
    strip_width = 0.45 * max(1, clean.shape[0])
    figure = Figure(figsize=(1.6 + columns * strip_width, 0.3 + 0.55 * len(names)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(names), columns, squeeze=False)
    for row, name in enumerate(names):
        cells = [clean] + [samples[name][severity] for severity in severities]
        for column, images in enumerate(cells):
            axis = axes[row][column]
            axis.imshow(np.concatenate(list(images), axis=1), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title("clean" if column == 0 else f"severity {severities[column - 1]}", fontsize=7)
        axes[row][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    figure.subplots_adjust(left=0.2, right=0.99, top=0.97, bottom=0.01, wspace=0.05, hspace=0.08)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def print_summary(names: list[str], seconds: dict[str, float], images_per_corruption: int) -> None:
    table = Table(title="tta corrupt: throughput (all 5 severities)")
    table.add_column("corruption")
    table.add_column("images", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("images/s", justify="right")
    for name in names:
        table.add_row(name, str(images_per_corruption), f"{seconds[name]:.2f}", f"{images_per_corruption / max(seconds[name], 1e-9):,.0f}")
    total = sum(seconds.values())
    table.add_row(
        "total", str(images_per_corruption * len(names)), f"{total:.2f}", f"{images_per_corruption * len(names) / max(total, 1e-9):,.0f}"
    )
    console.print(table)
