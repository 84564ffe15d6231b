"""The `tta` command: one Typer app; each sub-command lives in `tta_cli/commands/<name>.py`."""

from __future__ import annotations

import os
import signal
import sys


def _quiet_interrupt(signum, frame) -> None:
    """Ctrl-C while the program is still importing (torch takes seconds): nothing is written yet, so leave at once
    with the shell's Ctrl-C code instead of an import traceback."""
    os._exit(130)


# only for the `tta` program itself: importing tta_cli.cli in a test or a notebook leaves Ctrl-C alone
if os.path.basename(sys.argv[0]) == "tta" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _quiet_interrupt)

import typer  # noqa: E402  (after the handler: these imports are the slow part)
from rich.markup import escape  # noqa: E402

from tta_cli.commands import adapt, corrupt, models, stream, train  # noqa: E402
from tta_cli.commands.common import INTERRUPTED_EXIT, console  # noqa: E402

try:  # typer >= 0.2x parses with its own copy of click
    from typer._click import exceptions as click_errors  # noqa: E402
except ImportError:  # older typer: click itself
    from click import exceptions as click_errors  # noqa: E402
# Ctrl-C inside a prompt or a click callback; typer's own copy of click keeps Abort in typer.exceptions
ABORT = getattr(click_errors, "Abort", None) or getattr(typer, "Abort", KeyboardInterrupt)

app = typer.Typer(
    name="tta",
    help="Test-time training for vision classifiers: train, corrupt, adapt, stream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
for module in (train, corrupt, adapt, stream, models):
    module.register(app)


def main() -> None:
    """Console-script entry point. Ctrl-C raises KeyboardInterrupt again once the commands run: they turn it into one
    line and exit code 130, with nothing partial left under a final output name (tta_cli/outputs.py). A flag that
    click cannot parse (`--n abc`, an unknown option) is one red line and exit code 2 too, instead of a usage box."""
    if signal.getsignal(signal.SIGINT) is _quiet_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as error:  # `tta` or `tta stream` alone: the help, as before
        error.show()
        code = error.exit_code
    except click_errors.ClickException as error:  # a flag's value of the wrong type, an unknown option: one line as well
        command = f"{error.ctx.command_path}: " if getattr(error, "ctx", None) is not None else ""
        help_hint = f" (see {error.ctx.command_path} --help)" if command else ""
        console.print(f"[bold red]error:[/] {escape(command + error.format_message() + help_hint)}", highlight=False, soft_wrap=True)
        code = error.exit_code
    except ABORT:
        code = INTERRUPTED_EXIT
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
