"""`tta train` end to end through the Typer app: checkpoint files, reload, --resume, refusals, bad inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICKSTART, TINY_TRAIN_ARGS, crash_after_epoch, run_cli
from safetensors.torch import load_file


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr (the error), no traceback anywhere."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_train_writes_weights_and_a_description_of_them(tiny_checkpoint):
    meta = yaml.safe_load((tiny_checkpoint / "model.yaml").read_text())
    assert (tiny_checkpoint / "model.safetensors").is_file()
    assert meta["format"] == "tta-checkpoint/1"
    assert meta["config"]["model"]["depth"] == 8 and meta["config"]["optim"]["epochs"] == 1
    assert len(meta["class_names"]) == 10 and len(meta["normalization"]["mean"]) == 3
    assert meta["metrics"]["epoch"] == 1 and 0.0 <= meta["metrics"]["test_acc"] <= 1.0
    batch, train_images = meta["config"]["optim"]["batch_size"], meta["config"]["data"]["limit_train"]
    seen = (train_images // batch) * batch  # one epoch of whole batches
    assert meta["metrics"]["train_images_per_s"] == pytest.approx(seen / meta["metrics"]["train_seconds"])


def test_checkpoint_reloads_to_identical_outputs_and_metrics(tiny_checkpoint):
    from tta_cli.data.sources import load_split
    from tta_cli.models import build_model
    from tta_cli.tasks import build_task
    from tta_cli.train.checkpoint import load_model
    from tta_cli.train.loop import evaluate

    model, config, meta = load_model(tiny_checkpoint)
    trained = build_model(config.model, build_task(config.task), meta["normalization"]["mean"], meta["normalization"]["std"])
    trained.load_state_dict(torch.load(tiny_checkpoint / "resume.pt", weights_only=False)["model"])  # the live weights, saved apart
    model.eval(), trained.eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), trained(images))
        assert torch.equal(model.ssl(images), trained.ssl(images))
    test_set = load_split("cifar10-mini", "test", limit=50, seed=0)
    recomputed = evaluate(model, build_task(config.task), test_set, torch.device("cpu"))
    assert recomputed["test_acc"] == meta["metrics"]["test_acc"]
    assert recomputed["test_ssl_acc"] == meta["metrics"]["test_ssl_acc"]


def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path):
    args = ["train", QUICKSTART, *TINY_TRAIN_ARGS, "--epochs", "2", "--batch-size", "64"]
    assert run_cli([*args, "--out", tmp_path / "whole"]).exit_code == 0

    with crash_after_epoch(1):
        crashed = run_cli([*args, "--out", tmp_path / "resumed"])
    assert isinstance(crashed.exception, RuntimeError)
    assert not (tmp_path / "resumed" / "model.yaml").exists()

    resumed = run_cli(["train", "--resume", "--out", tmp_path / "resumed"])  # the saved config wins
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 1" in resumed.stderr
    whole, again = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(whole[name], again[name]) for name in whole)
    history = torch.load(tmp_path / "resumed" / "resume.pt", weights_only=False)["history"]
    assert [record["epoch"] for record in history] == [1, 2]


def test_resume_with_more_epochs_continues_from_the_saved_epoch(tiny_checkpoint, tmp_path):
    run = shutil.copytree(tiny_checkpoint, tmp_path / "run")
    saved = torch.load(run / "resume.pt", weights_only=False)
    saved["history"][0]["seconds"] = 1000.0  # as if the first process had trained for that long
    torch.save(saved, run / "resume.pt")
    first_epoch = saved["history"][0]
    result = run_cli(["train", "--resume", "--epochs", "2", "--out", run])
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1" in result.stderr
    state = torch.load(run / "resume.pt", weights_only=False)
    assert state["epoch"] == 2 and state["history"][0] == first_epoch
    metrics = yaml.safe_load((run / "model.yaml").read_text())["metrics"]
    assert metrics["epoch"] == 2
    assert state["history"][1]["seconds"] > 1000.0  # the time of both processes, not of the last alone
    assert metrics["train_seconds"] > 1000.0


def test_resume_without_a_previous_run_is_one_line(tmp_path):
    assert_one_line_error(run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--resume", "--out", tmp_path / "nothing"]), "resume.pt")


def test_existing_checkpoint_is_not_overwritten_without_force(tiny_checkpoint):
    before = file_bytes(tiny_checkpoint)
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--out", tiny_checkpoint])
    assert_one_line_error(result, "already holds a checkpoint", "--force")
    assert file_bytes(tiny_checkpoint) == before


def test_force_overwrites_an_existing_checkpoint(tiny_checkpoint, tmp_path):
    run = shutil.copytree(tiny_checkpoint, tmp_path / "run")
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--seed", "1", "--out", run, "--force"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "model.yaml").read_text())["config"]["seed"] == 1


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--data", "no/such/folder"], "no/such/folder"),
        (["--set", "model.backbone=resnet9000"], "unknown backbone 'resnet9000'"),
        (["--set", "task.name=jigsaw"], "unknown task 'jigsaw'"),
        (["--set", "model.split=layer7"], "unknown split 'layer7'"),
        (["--set", "optim.schedule=linear"], "unknown schedule 'linear'"),
        (["--set", "compile_mode=turbo"], "unknown compile_mode 'turbo'"),
        (["--set", "model.colour=blue"], "unknown config key 'model.colour'"),
        (["--batch-size", "512"], "fewer than one batch"),
        (["--set", "optim.lr=-0.1"], "optim.lr must be at least 0, got -0.1"),
        (["--set", "optim.momentum=1"], "optim.momentum must be in [0, 1), got 1"),
        (["--set", "optim.clip_grad_norm=0"], "optim.clip_grad_norm must be above 0"),
    ],
    ids=["missing-data", "backbone", "task", "split", "schedule", "compile-mode", "config-key", "batch-too-large", "lr", "momentum", "clip"],
)
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, flags, fragment):
    out = tmp_path / "run"
    assert_one_line_error(run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, *flags, "--out", out]), fragment)
    assert not out.exists()


def test_missing_recipe_or_a_folder_without_images_is_one_line(tmp_path):
    assert_one_line_error(run_cli(["train", tmp_path / "nope.yaml", "--out", tmp_path / "run"]), "nope.yaml")
    (tmp_path / "empty").mkdir()
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--data", tmp_path / "empty", "--out", tmp_path / "run"])
    assert_one_line_error(result, "holds no images")
    assert not (tmp_path / "run").exists()


def test_images_of_another_size_are_resized_to_the_models_input(cifar_classes_48px, tmp_path):
    """A ViT's patch grid is fixed by model.img_size (32), so 48x48 images must be resized to train at all."""
    vit = ["--set", "model.backbone=vit", "--set", "model.split=block3", "--set", "model.embed_dim=32", "--set", "model.vit_depth=4",
           "--set", "model.vit_heads=2", "--set", "model.patch_size=4"]
    args = ["train", QUICKSTART, "--data", cifar_classes_48px, "--epochs", "1", "--batch-size", "8", "--device", "cpu", *vit]
    result = run_cli([*args, "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_broken_yaml_in_a_recipe_or_a_set_value_is_one_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("optim:\n  lr: [\n")
    assert_one_line_error(run_cli(["train", recipe, "--out", tmp_path / "run"]), "broken.yaml is not valid YAML", "line 3")
    assert_one_line_error(run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--set", "optim.lr=[", "--out", tmp_path / "run"]), "not valid YAML")
    recipe.write_text("- optim\n- model\n")
    assert_one_line_error(run_cli(["train", recipe, "--out", tmp_path / "run"]), "holds a YAML list", "a mapping of settings")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_broken_yaml_is_one_line(tiny_checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.yaml").write_text("config: {model: [\n")
    assert_one_line_error(run_cli(["adapt", "--ckpt", broken, "--device", "cpu"]), "model.yaml is not valid YAML")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path):
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--device", "cuda", "--out", tmp_path / "run"])
    assert_one_line_error(result, "no CUDA GPU")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags",
    [["--lr", "1e30"], ["--set", "optim.lr=1e30"], ["--lr", "1e30", "--batch-size", "32"]],
    ids=["flag", "set", "several-steps"],
)
def test_nan_loss_stops_training_and_overwrites_nothing(tiny_checkpoint, tmp_path, flags):
    run = shutil.copytree(tiny_checkpoint, tmp_path / "run")
    before = file_bytes(run)
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, *flags, "--out", run, "--force"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "diverged" in errors[0] and result.stderr.strip().endswith(errors[0])
    assert file_bytes(run) == before


def leaf_commands() -> dict[str, object]:
    """Every runnable command of the app by its path (`train`, ..., `stream make`), read from the click tree."""
    import typer

    from tta_cli.cli import app

    def walk(command, path: list[str]) -> dict[str, object]:
        children = getattr(command, "commands", None)  # a group (typer vendors its own click)
        if children:
            return {leaf: found for name, child in sorted(children.items()) for leaf, found in walk(child, [*path, name]).items()}
        return {" ".join(path): command}

    return walk(typer.main.get_command(app), [])


@pytest.mark.parametrize("command", list(leaf_commands()))
def test_every_command_help_shows_examples(command):
    result = run_cli([*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.stdout and f"tta {command} " in result.stdout


@pytest.mark.parametrize("command", list(leaf_commands()))
def test_every_command_help_keeps_prose_whole_and_examples_within_80_columns(command):
    """Typer keeps single line breaks: a prose line broken in the source shows as a ragged half line, and an
    indented example wider than the terminal wraps without its indent."""
    for block in (leaf_commands()[command].help or "").split("\n\n"):
        lines = block.split("\n")
        for before, line in zip(lines, lines[1:], strict=False):
            assert before.startswith("  ") or line.startswith("  "), f"prose broken after {before!r}"
        assert all(len(line) <= 78 for line in lines if line.startswith("  ")), "an example over 78 columns"
