"""The packaged pretrained checkpoints (tta_cli/train/zoo.py): listed by `tta models`, loaded by name everywhere."""

from __future__ import annotations

import re
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli
from test_cli_train import assert_one_line_error

from tta_cli.train import zoo

NAME = "resnet26_gn.rotation_sun2020_cifar10"


def test_the_paper_recipe_resnet26_is_packaged_with_its_record():
    model = zoo.MODELS[NAME]
    assert model.weights.is_file() and (model.folder / "model.yaml").is_file()
    assert 2e6 < model.size_bytes() < 3e6 and model.size_bytes() > 4 * model.parameters()  # fp32, about 0.65 M numbers


def test_every_packaged_folder_is_listed_and_its_card_states_what_training_measured():
    folders = {path.parent.name for path in zoo.PRETRAINED_DIR.glob("*/model.safetensors")}
    assert set(zoo.MODELS) == folders and NAME in folders
    for model in zoo.MODELS.values():
        metrics = yaml.safe_load((model.folder / "model.yaml").read_text())["metrics"]
        assert model.clean_accuracy == pytest.approx(100 * metrics["test_acc"], abs=0.005)
        assert f"{model.clean_accuracy:.2f}%" in (model.folder / "README.md").read_text()
        assert (REPO / model.recipe).is_file() and model.recipe in model.command


def test_pyproject_ships_every_packaged_file():
    line = next(line for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith('"tta_cli.train" ='))
    patterns = re.findall(r'"([^"]+)"', line.split("=", 1)[1])  # (tomllib is Python 3.11+; the project takes 3.10)
    package = REPO / "tta_cli" / "train"
    for path in zoo.PRETRAINED_DIR.rglob("*"):
        if path.is_file():
            assert any(fnmatch(path.relative_to(package).as_posix(), pattern) for pattern in patterns), path


def test_tta_models_lists_the_packaged_model_with_accuracy_size_and_recipe():
    result = run_cli(["models"])
    assert result.exit_code == 0, result.output
    model = zoo.MODELS[NAME]
    for text in (NAME, f"{model.clean_accuracy:.1f}", f"{model.size_bytes() / 1e6:.1f} MB", model.recipe):
        assert text in result.stdout


def test_a_packaged_name_works_as_ckpt_in_adapt(tmp_path):
    out = tmp_path / "adapt"
    result = run_cli(["adapt", "--ckpt", NAME, "--corruptions", "gaussian_noise", "--n", "10", "--method", "source,ttt-online",
                      "--copies", "4", "--device", "cpu", "--out", out])
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file() and NAME in (out / "results.json").read_text()


def test_load_checkpoint_takes_a_packaged_name():
    import tta_cli as tta

    checkpoint = tta.load_checkpoint(NAME)
    assert checkpoint.image_size == 32 and len(checkpoint.class_names) == 10
    assert checkpoint.metrics["test_acc"] == pytest.approx(zoo.MODELS[NAME].clean_accuracy / 100, abs=5e-4)


def test_a_mistyped_name_is_one_line_that_suggests_the_right_one():
    result = run_cli(["adapt", "--ckpt", NAME.replace("26", "62"), "--device", "cpu"])
    assert_one_line_error(result, "packaged model name", NAME, "tta models")


def test_a_folder_on_disk_of_the_same_name_wins(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_checkpoint, tmp_path / NAME, ignore=shutil.ignore_patterns("resume.pt"))
    from tta_cli.train.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(NAME) == Path(NAME)
    assert resolve_checkpoint(f"./{NAME}") == Path(NAME)
