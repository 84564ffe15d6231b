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

from tta_cli.commands import adapt, corrupt, stream, train  # noqa: E402

app = typer.Typer(
    name="tta",
    help="Test-time training for vision classifiers: train, corrupt, adapt, stream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
for module in (train, corrupt, adapt, stream):
    module.register(app)


def main() -> None:
    """Console-script entry point. Ctrl-C raises KeyboardInterrupt again once the commands run: they turn it into one
    line and exit code 130, with nothing partial left under a final output name (tta_cli/outputs.py)."""
    if signal.getsignal(signal.SIGINT) is _quiet_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    app()


if __name__ == "__main__":
    main()
