"""Options and helpers shared by every command, so `--data`, `--ckpt`, `--device`, `--out`,
`--seed` and `--set` mean the same thing everywhere."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from tta_cli.distributed import is_main, requested_world_size
from tta_cli.errors import TTAError

console = Console(stderr=True)
OTHER_RANK_EXIT_DELAY_S = 3.0  # torchrun stops every rank once one exits: give rank 0 time to print the error
F = TypeVar("F", bound=Callable[..., Any])

DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Image source: cifar10-mini (embedded), cifar10, a class-folder tree, a .tar/.tar.gz of one, or a shifted-set folder.",
    ),
]
DataRootOpt = Annotated[
    str | None, typer.Option("--data-root", help="Folder holding torchvision's cifar-10-batches-py (for --data cifar10).")
]
CkptOpt = Annotated[Path, typer.Option("--ckpt", help="A `tta train` output folder or its model.safetensors file.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto takes CUDA when present).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder (results, checkpoints, JSON/CSV).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed; the same seed gives the same result.")]
def set_option(what: str, example: str):
    """The `--set key=value` option, with help that names this command's own keys."""
    return Annotated[list[str] | None, typer.Option("--set", help=f"Override any {what} (repeatable): {example}.")]


SetOpt = set_option("recipe key", "--set optim.lr=0.05 --set model.norm=bn")
AdaptSetOpt = set_option("adapt setting (the keys of results.json 'settings')", "--set compile=false --set streams=1")
StreamSetOpt = set_option("stream setting (the keys of each run's 'settings' in summary.json)", "--set momentum=0.9 --set amp=false")


def user_errors(command: F) -> F:
    """Turn TTAError into one red line on stderr and exit code 2 (no traceback). Under torchrun only rank 0
    prints anything (the other ranks run the same command on the same inputs, so they fail alike)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet = console.quiet
        console.quiet = quiet or not is_main()
        try:
            return command(*args, **kwargs)
        except TTAError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            if not is_main():
                time.sleep(OTHER_RANK_EXIT_DELAY_S)
            raise typer.Exit(2) from None
        finally:
            console.quiet = quiet

    return wrapper  # type: ignore[return-value]


def single_process(command: F) -> F:
    """Refuse to start under torchrun with several processes: for work that is one sequential stream."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if requested_world_size() > 1:
            raise TTAError(
                f"tta stream adapts online, so it runs as one process: the weights for frame t+1 depend on the update "
                f"at frame t, and a stream cannot be split over {requested_world_size()} torchrun processes; run it without torchrun"
            )
        return command(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
