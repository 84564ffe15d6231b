"""Options and helpers shared by every command, so `--data`, `--ckpt`, `--device`, `--out`,
`--seed` and `--set` mean the same thing everywhere."""

from __future__ import annotations

import errno
import functools
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tta_cli.distributed import is_main, requested_world_size
from tta_cli.errors import TTAError

console = Console(stderr=True)
OTHER_RANK_EXIT_DELAY_S = 3.0  # torchrun stops every rank once one exits: give rank 0 time to print the error
F = TypeVar("F", bound=Callable[..., Any])

DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="cifar10-mini, cifar10, a folder or .tar(.gz), a shifted set.",
    ),
]
DataRootOpt = Annotated[
    str | None, typer.Option("--data-root", help="Folder holding torchvision's cifar-10-batches-py (for --data cifar10).")
]
CkptOpt = Annotated[Path, typer.Option("--ckpt", help="tta train folder or tta models name.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder for the results.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (same seed, same result).")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing result, whole.")
]


def help_text(command: Callable, examples: str = "") -> str:
    """A command's --help: its docstring, then `examples`. Typer's rich mode keeps single line breaks, so the
    lines of each prose run are joined into one (the terminal wraps it); indented lines (examples, lists) stay."""
    text = inspect.cleandoc(command.__doc__ or "") + "\n\n" + examples.strip("\n")
    blocks = []
    for block in text.strip().split("\n\n"):
        lines: list[str] = []
        for line in block.split("\n"):
            if lines and not line.startswith("  ") and not lines[-1].startswith("  "):
                lines[-1] += " " + line
            else:
                lines.append(line)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def set_option(what: str, example: str):
    """The `--set key=value` option, with help that names this command's own keys."""
    return Annotated[list[str] | None, typer.Option("--set", help=f"Override any {what} (repeatable): {example}.")]


SetOpt = set_option("recipe key", "--set optim.lr=0.05 --set model.norm=bn")
AdaptSetOpt = set_option("setting", "--set tent.lr=5e-4")
StreamSetOpt = set_option("stream setting (the keys of each run's 'settings' in summary.json)", "--set momentum=0.9 --set amp=false")


INTERRUPTED_EXIT = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)
# I/O errors a user causes (full disk, permissions, a file where a folder should be): one line, not a traceback
USER_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EEXIST,
    errno.ENAMETOOLONG,
}
OUT_OF_MEMORY = "out of memory: the sizes asked for do not fit in this machine's memory; choose smaller ones"


def user_errors(command: F) -> F:
    """Turn TTAError into one red line on stderr and exit code 2 (no traceback). Under torchrun only rank 0
    prints anything (the other ranks run the same command on the same inputs, so they fail alike).

    A safety net behind the checks at the boundary: a user-caused OSError (disk full, permission denied) or an
    out-of-memory error is one line and exit 2 too, and Ctrl-C is one line and exit 130 (outputs.py guarantees
    that nothing partial is left under a final name)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet = console.quiet
        console.quiet = quiet or not is_main()
        try:
            return command(*args, **kwargs)
        except TTAError as error:
            fail(str(error), 2)
        except OSError as error:
            if error.errno not in USER_ERRNOS:
                raise
            where = f"{error.filename}: " if error.filename else ""
            fail(f"{where}{error.strerror or error}", 2)
        except EOFError:  # click would print "Aborted!" and exit 1
            fail("an input ended early (a truncated file or a closed stdin)", 2)
        except MemoryError:
            fail(OUT_OF_MEMORY, 2)
        except RuntimeError as error:  # torch's allocators raise RuntimeError (torch.OutOfMemoryError on CUDA)
            if "out of memory" not in str(error) and "can't allocate memory" not in str(error):
                raise
            fail(OUT_OF_MEMORY, 2)
        except KeyboardInterrupt:
            fail("interrupted by Ctrl-C; nothing partial was written under the output's final name", INTERRUPTED_EXIT)
        finally:
            console.quiet = quiet

    return wrapper  # type: ignore[return-value]


def fail(message: str, code: int) -> None:
    """Print one red line and exit with `code`."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if not is_main():
        time.sleep(OTHER_RANK_EXIT_DELAY_S)
    raise typer.Exit(code) from None


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
