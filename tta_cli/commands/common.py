"""Options and helpers shared by every command, so `--data`, `--ckpt`, `--device`, `--out`,
`--seed` and `--set` mean the same thing everywhere."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from tta_cli.errors import TTAError

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Image source: cifar10-mini (embedded), cifar10, a class-folder tree, a .tar/.tar.gz of one, or a shifted-set folder."),
]
DataRootOpt = Annotated[
    str | None, typer.Option("--data-root", help="Folder holding torchvision's cifar-10-batches-py (for --data cifar10).")
]
CkptOpt = Annotated[Path, typer.Option("--ckpt", help="A `tta train` output folder or its model.safetensors file.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto takes CUDA when present).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder (results, checkpoints, JSON/CSV).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed; the same seed gives the same result.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any recipe key: --set optim.lr=0.05 --set model.norm=bn (repeatable)."),
]


def user_errors(command: F) -> F:
    """Turn TTAError into one red line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except TTAError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
