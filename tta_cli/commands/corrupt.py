"""`tta corrupt`: write CIFAR-10-C style corrupted copies of a clean test split (official .npy layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tta_cli.commands.common import DataOpt, DataRootOpt, DeviceOpt, ForceOpt, OutOpt, SeedOpt, console, help_text, user_errors
from tta_cli.corrupt.writer import PREVIEW_IMAGES, write_sets
from tta_cli.data.imageset import mix_classes
from tta_cli.device import resolve_device
from tta_cli.errors import TTAError

DEFAULT_SOURCE = "cifar10-mini"

EXAMPLES = """
Examples:
  tta corrupt --out data/cifar10_c
  tta corrupt --data cifar10-jpeg.tar.gz --out data/cifar10_c --device cuda
  tta corrupt --corruptions gaussian_noise,fog --n 500 --out c --preview c.png
  tta corrupt --corruptions extra --severities 5 --out data/cifar10_c_extra
"""


def register(app: typer.Typer) -> None:
    app.command("corrupt", help=help_text(corrupt_command, EXAMPLES))(user_errors(corrupt_command))


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
        samples, seconds = write_with_progress(folder, clean, names, shown_severities, seed, torch_device, source, order)
    if preview is not None:
        from tta_cli.plots import write_preview

        write_preview(preview, clean.images[:PREVIEW_IMAGES].numpy(), samples, shown_severities)
        console.print(f"preview: {preview}")
    print_summary(names, seconds, count * len(SEVERITIES))


def write_with_progress(folder: Path, clean, names: list[str], shown_severities: list[int], seed: int, device, source: str, order):
    """corrupt/writer.write_sets under a progress bar, one step per corruption."""
    progress = Progress(
        TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True
    )
    with progress:
        bar = progress.add_task("corrupting", total=len(names))
        result = write_sets(folder, clean, names, shown_severities, seed, device, source, order, lambda name: progress.advance(bar))
    return result


def parse_severities(text: str) -> list[int]:
    """Parse "1,3,5" into [1, 3, 5]; anything outside 1..5 is a user error."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or any(value not in range(1, 6) for value in values):
        raise TTAError(f"--severities takes a comma list of 1..5 (e.g. 1,2,3,4,5 or 5); got {text!r}")
    return values


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
