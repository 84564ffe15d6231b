"""`tta models`: the pretrained checkpoints shipped in the package, which `--ckpt NAME` loads."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from tta_cli.commands.common import help_text, user_errors

EXAMPLES = """
Examples:
  tta models
  tta adapt --ckpt resnet26_gn.rotation_sun2020_cifar10 --method ttt-online
"""


def register(app: typer.Typer) -> None:
    app.command("models", help=help_text(models_command, EXAMPLES))(user_errors(models_command))


def models_command() -> None:
    """List the packaged pretrained checkpoints: name, clean accuracy, size and the recipe that made them.

    They ship inside the package (no download); `--ckpt NAME` loads one in `tta adapt` and `tta stream run`."""
    from tta_cli.train.zoo import MODELS

    table = Table(title="packaged checkpoints (--ckpt NAME)", caption="clean: top-1 on the 10,000 CIFAR-10 test images")
    for column in ("name", "clean %", "size", "parameters", "recipe", "trained"):
        table.add_column(column, justify="right" if column in ("clean %", "size", "parameters") else "left", no_wrap=column == "name")
    for model in MODELS.values():
        size = f"{model.size_bytes() / 1e6:.1f} MB" if model.weights.is_file() else "missing"
        parameters = f"{model.parameters() / 1e6:.2f} M" if model.weights.is_file() else "-"
        table.add_row(model.name, f"{model.clean_accuracy:.1f}", size, parameters, model.recipe, model.trained)
    Console(width=max(Console().width, 140)).print(table)  # stdout: a listing a user may pipe
    for model in MODELS.values():
        Console(soft_wrap=True, highlight=False).print(f"{model.name}: {model.architecture}; trained on {model.data} with `{model.command}`")
