"""The `tta` command: one Typer app; each sub-command lives in `tta_cli/commands/<name>.py`."""

from __future__ import annotations

import typer

from tta_cli.commands import adapt, corrupt, stream, train

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
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
