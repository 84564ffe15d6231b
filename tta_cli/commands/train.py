"""`tta train`: joint training of encoder + main head + self-supervised head on source data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tta_cli import distributed
from tta_cli.commands.common import DataOpt, DataRootOpt, DeviceOpt, OutOpt, SeedOpt, SetOpt, console, help_text, user_errors
from tta_cli.config import TrainConfig, load_config, parse_overrides, set_dotted
from tta_cli.device import resolve_device

EXAMPLES = """
Examples:
  tta train recipes/quickstart.yaml
  tta train recipes/sun2020-rotation-gn.yaml --data cifar10 --out runs/sun
  tta train recipes/sun2020-rotation-gn.yaml --out runs/sun --resume
  tta train recipes/masked-vit-tiny.yaml --epochs 5 --set optim.lr=1e-3
  tta train recipes/init-from-classifier.yaml --init r18.pth --out runs/r18
  torchrun --nproc-per-node 4 -m tta_cli.cli -- train RECIPE --out runs/4gpu
"""


def register(app: typer.Typer) -> None:
    app.command("train", help=help_text(train_command, EXAMPLES))(user_errors(train_command))


def train_command(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe (see recipes/). Flags and --set override its keys.")] = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    out: OutOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Override optim.epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Override optim.batch_size.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Override optim.lr.")] = None,
    compile_model: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the training step.")] = None,
    limit_train: Annotated[int | None, typer.Option("--limit-train", help="Use only n training images.")] = None,
    limit_test: Annotated[int | None, typer.Option("--limit-test", help="Use only n test images.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last finished epoch.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing checkpoint in --out.")] = False,
    init: Annotated[str | None, typer.Option(
        "--init", help="Start from your classifier's weights (.pth/.pt/.safetensors or a tta checkpoint); "
        "model.backbone names its architecture. Sets init.weights.")] = None,
    overrides: SetOpt = None,
) -> None:
    """Train a TTT model jointly (classifier + self-supervised head) and write a checkpoint folder.

    The folder (model.safetensors + model.yaml, plus resume.pt for --resume) is what `tta adapt` and
    `tta stream` load. An existing checkpoint is never overwritten without --force.

    With --init FILE the encoder and main head are a classifier you trained: a new ssl head trains alone, then all
    of it at a low rate (init.* keys). The final metrics give the classifier's clean accuracy before and after."""
    from tta_cli.data.sources import load_split
    from tta_cli.train.loop import check_config, check_data

    flags: dict = parse_overrides(overrides or [])
    for key, value in {
        "data.source": data,
        "data.root": data_root,
        "out": str(out) if out else None,
        "device": device,
        "seed": seed,
        "optim.epochs": epochs,
        "optim.batch_size": batch_size,
        "optim.lr": lr,
        "compile": compile_model,
        "data.limit_train": limit_train,
        "data.limit_test": limit_test,
        "init.weights": init,
    }.items():
        if value is not None:
            set_dotted(flags, key, value)
    config = load_config(TrainConfig, recipe, flags)
    if resume:
        config = resumed_config(config, flags)
    torch_device = distributed.init(resolve_device(config.device))  # under torchrun: join the group, cuda:LOCAL_RANK
    check_config(config, resume, force)  # before any output, data loading or file writing
    with console.status(f"loading {config.data.source} ..."):
        # images of another size are resized to the model's input (shorter side, then a center crop)
        size = config.model.img_size
        train_set = load_split(config.data.source, "train", root=config.data.root, limit=config.data.limit_train, seed=config.seed, image_size=size)
        test_set = load_split(config.data.source, "test", root=config.data.root, limit=config.data.limit_test, seed=config.seed, image_size=size)
    check_data(config, train_set, test_set)
    model = config.model
    arch = {"timm_resnet": model.timm_name, "torchvision_resnet": model.torchvision_name}.get(model.backbone, f"depth {model.depth}")
    console.print(
        f"[bold]tta train[/] {model.backbone} {arch} ({model.norm}), split {model.split}, task {config.task.name}, "
        f"{len(train_set)} train / {len(test_set)} test images on {torch_device}" + (f", from {config.init.weights}" if config.init.weights else "")
    )
    result = run_with_progress(config, train_set, test_set, torch_device, resume, force)
    print_summary(result)


def resumed_config(config: TrainConfig, flags: dict) -> TrainConfig:
    """With --resume the saved config wins (same model, same schedule), except flags given now."""
    from tta_cli.config import from_dict, merge
    from tta_cli.train.checkpoint import load_resume

    saved = load_resume(Path(config.out)).get("config")
    if saved is None:
        return config
    return from_dict(TrainConfig, merge(saved, flags))


def run_with_progress(config, train_set, test_set, device, resume, force):
    from tta_cli.train.loop import train

    if not distributed.is_main():  # under torchrun rank 0 shows the progress
        return train(config, train_set, test_set, device, resume=resume, force=force)
    columns = (
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("train", total=None, epoch="-", info="")

        def on_event(kind: str, **values) -> None:
            if kind == "start":
                progress.update(bar, total=values["epochs"] * values["steps_per_epoch"],
                                completed=values["start_epoch"] * values["steps_per_epoch"])
            elif kind == "step":
                progress.update(bar, advance=1, epoch=values["epoch"] + 1)
            elif kind == "epoch":
                info = f"loss {values['train_loss']:.3f} acc {values['train_acc']:.3f}"
                if "test_acc" in values:
                    info += f" | test acc {values['test_acc']:.4f}"
                    progress.console.print(f"epoch {values['epoch']}: {info}")
                progress.update(bar, info=info)
            elif kind == "resumed":
                progress.console.print(f"resuming after epoch {values['epoch']}")

        return train(config, train_set, test_set, device, resume=resume, force=force, on_event=on_event)


def print_summary(result) -> None:
    table = Table(title="tta train: final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if "init_test_acc_before" in result.metrics:
        before, after = result.metrics["init_test_acc_before"], result.metrics["init_test_acc_after"]
        console.print(f"the classifier's clean accuracy: {100 * before:.2f}% before, {100 * after:.2f}% after "
                      f"({100 * (after - before):+.2f} points)")
    console.print(f"checkpoint: {result.out_dir}/model.safetensors + model.yaml")
