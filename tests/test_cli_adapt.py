"""`tta adapt` end to end through the Typer app: outputs, a `tta corrupt` folder read back, bad inputs."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml
from conftest import run_cli
from test_cli_train import assert_one_line_error

TINY_ADAPT_ARGS = ["--n", "20", "--steps", "1", "--copies", "4", "--device", "cpu"]


def test_adapt_writes_results_json_csv_and_a_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "adapt"
    result = run_cli([
        "adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--corruptions", "gaussian_noise,fog",
        "--severities", "5", "--method", "source,ttt,ttt-online", *TINY_ADAPT_ARGS, "--out", out, "--plot", out / "p.png",
    ])
    assert result.exit_code == 0, result.output
    assert "mean" in result.stderr and "ttt-online" in result.stderr  # the rich table

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["methods"] == ["source", "ttt", "ttt-online"]
    assert results["settings"]["steps"] == 1 and results["settings"]["copies"] == 4
    assert results["selection"] == {"corruptions": "gaussian_noise,fog", "severities": [5], "n": 20}
    assert {"source", "ttt", "ttt-online"} <= set(results["semantics"])
    assert results["table"]["corruptions"] == ["gaussian_noise", "fog"]
    for method in ("source", "ttt", "ttt-online"):
        assert results["methods"][method]["samples"] == 40 and results["methods"][method]["seconds"] > 0
        first = results["methods"][method]["first_batch"]
        assert 0 < first["samples"] <= 40 and 0 < first["seconds"] <= results["methods"][method]["seconds"]
        assert results["methods"][method]["precision"] == "float32"  # bf16 autocast happens on CUDA only
        assert results["methods"][method]["convolutions"] == "torch"  # Triton's only on CUDA
        assert 0.0 <= results["table"]["mean"][method] <= 100.0
    assert results["methods"]["ttt-online"]["counters"]["updates"] == 40
    assert results["methods"]["ttt"]["counters"] == {"skipped_steps": 0}

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["method"], row["corruption"]) for row in rows] == [
        (method, corruption) for method in ("source", "ttt", "ttt-online") for corruption in ("gaussian_noise", "fog")
    ]
    assert {row["n"] for row in rows} == {"20"} and {row["severity"] for row in rows} == {"5"}
    assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapt_reads_a_tta_corrupt_folder(tiny_checkpoint, tmp_path):
    shifted = tmp_path / "shifted"
    made = run_cli(["corrupt", "--corruptions", "gaussian_noise,fog", "--n", "20", "--device", "cpu", "--out", shifted])
    assert made.exit_code == 0, made.output
    out = tmp_path / "adapt"
    arguments = ["adapt", "--ckpt", tiny_checkpoint, "--data", shifted, "--severities", "5", "--method", "source", *TINY_ADAPT_ARGS]
    result = run_cli([*arguments, "--out", out])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["corruption"], row["severity"], row["n"]) for row in rows] == [("gaussian_noise", "5", "20"), ("fog", "5", "20")]


def test_unknown_method_is_one_line_before_any_work(tiny_checkpoint, tmp_path):
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "source,magic", *TINY_ADAPT_ARGS, "--out", tmp_path / "adapt"])
    assert_one_line_error(result, "unknown method 'magic'")
    assert not (tmp_path / "adapt").exists()


def test_norm_on_a_groupnorm_model_is_one_line_before_any_work(tiny_checkpoint, tmp_path):
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "source,norm", *TINY_ADAPT_ARGS, "--out", tmp_path / "adapt"])
    assert_one_line_error(result, "no BatchNorm", "model.norm=bn")
    assert not (tmp_path / "adapt").exists()


def test_checkpoint_and_data_with_different_classes_is_one_line(tiny_checkpoint, tiny_folder):
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--data", tiny_folder, "--method", "source", "--device", "cpu"])
    assert_one_line_error(result, "3 classes", "trained on 10")


def test_checkpoint_of_another_architecture_is_one_line(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "wider")
    meta = yaml.safe_load((ckpt / "model.yaml").read_text())
    meta["config"]["model"]["width"] = 2  # the weights stay those of width 1
    (ckpt / "model.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    result = run_cli(["adapt", "--ckpt", ckpt / "model.safetensors", "--method", "source", *TINY_ADAPT_ARGS])
    assert_one_line_error(result, "does not match the model architecture", "has shape")


def test_missing_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(run_cli(["adapt", "--ckpt", tmp_path / "nowhere", "--device", "cpu"]), "not a tta checkpoint")


def test_online_streams_side_by_side_adapt_every_sample(tiny_checkpoint, tmp_path):
    out = tmp_path / "adapt"
    result = run_cli([
        "adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--corruptions", "gaussian_noise,fog,snow",
        "--method", "ttt-online", *TINY_ADAPT_ARGS, "--set", "streams=2", "--out", out,
    ])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["streams"] == 2
    assert results["methods"]["ttt-online"]["counters"]["updates"] == 60  # 3 streams of 20, in groups of 2 and 1
    assert all(0.0 <= error <= 100.0 for error in results["table"]["errors"]["ttt-online"])


def test_zero_streams_is_one_line_before_any_work(tiny_checkpoint, tmp_path):
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "ttt-online", *TINY_ADAPT_ARGS, "--set", "streams=0", "--out", tmp_path / "a"])
    assert_one_line_error(result, "streams must be at least 1")
    assert not (tmp_path / "a").exists()


def test_one_stream_online_default_runs_pipelined_and_predicts_as_the_plain_loop(tiny_checkpoint, tmp_path, monkeypatch):
    """The one-stream ttt-online default folds each prediction into the next update's forward pass (exactness is
    tested in float64 in test_adapt_online.py); through the CLI it is the path taken, and `--set pipeline=false`
    turns it off with the same predictions."""
    from tta_cli.adapt.methods.ttt_online import OnlineTTT

    calls = []
    pipelined = OnlineTTT._pipelined
    monkeypatch.setattr(OnlineTTT, "_pipelined", lambda self, *inputs: calls.append(1) or pipelined(self, *inputs))
    predictions, pipelined_calls = {}, {}
    for label, extra in (("default", []), ("plain", ["--set", "pipeline=false"])):
        calls.clear()
        out = tmp_path / label
        result = run_cli([
            "adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--corruptions", "gaussian_noise",
            "--method", "ttt-online", *TINY_ADAPT_ARGS, "--set", "streams=1", *extra, "--predictions", "--out", out,
        ])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "results.json").read_text())["settings"]["pipeline"] is (label == "default")
        with open(out / "predictions.csv", newline="") as handle:
            predictions[label] = [row["ttt-online"] for row in csv.DictReader(handle)]
        pipelined_calls[label] = len(calls)
    assert pipelined_calls == {"default": 19, "plain": 0}  # 20 samples: the first has no earlier one to predict
    assert len(predictions["default"]) == 20 and predictions["default"] == predictions["plain"]


def test_grouped_per_sample_ttt_runs_through_the_cli_and_predicts_as_vmap(tiny_checkpoint, tmp_path, monkeypatch):
    """`--set per_sample=grouped` reaches episodic TTT (the folded path is taken) and predicts as the vmap default
    (their equality is tested in float64 in test_adapt_grouped.py)."""
    from tta_cli.engine import grouped

    built = []
    monkeypatch.setattr(grouped.GroupedPerSampleModel, "__init__", _recording(grouped.GroupedPerSampleModel.__init__, built))
    predictions = {}
    for how in ("vmap", "grouped"):
        out = tmp_path / how
        result = run_cli([
            "adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--corruptions", "fog",
            "--method", "ttt", *TINY_ADAPT_ARGS, "--set", f"per_sample={how}", "--predictions", "--out", out,
        ])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "results.json").read_text())["settings"]["per_sample"] == how
        with open(out / "predictions.csv", newline="") as handle:
            predictions[how] = [row["ttt"] for row in csv.DictReader(handle)]
    assert len(built) == 1 and len(predictions["vmap"]) == 20 and predictions["grouped"] == predictions["vmap"]


def _recording(function, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapper


def test_a_clean_source_of_another_size_is_resized_but_a_shifted_set_must_match(tiny_checkpoint, cifar_classes_48px, tmp_path):
    """48x48 clean images are resized to the checkpoint's 32x32 before the corruption; ready-made shifted sets
    of 48x48 images are refused, since resizing them would change what their corruptions measure."""
    args = ["adapt", "--ckpt", tiny_checkpoint, "--method", "source", "--corruptions", "fog", "--device", "cpu"]
    result = run_cli([*args, "--data", cifar_classes_48px, "--out", tmp_path / "clean"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "clean" / "results.json").read_text())["methods"]["source"]["samples"] == 20
    made = run_cli(["corrupt", "--data", cifar_classes_48px, "--out", tmp_path / "c48", "--corruptions", "fog", "--severities", "5"])
    assert made.exit_code == 0, made.output
    assert_one_line_error(run_cli([*args, "--data", tmp_path / "c48", "--out", tmp_path / "shifted"]), "holds 48x48 images", "takes 32x32")
    assert not (tmp_path / "shifted").exists()


def test_unknown_per_sample_is_one_line_for_one_online_stream_too(tiny_checkpoint, tmp_path):
    """One ttt-online stream builds no per-sample path, yet a misspelt `per_sample` is refused, not ignored."""
    result = run_cli([
        "adapt", "--ckpt", tiny_checkpoint, "--method", "ttt-online", *TINY_ADAPT_ARGS, "--set", "per_sample=loops", "--out", tmp_path / "a"
    ])
    assert_one_line_error(result, "unknown per_sample 'loops'")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--copies", "0"], "copies must be at least 1"),
        (["--steps", "-1"], "steps must be at least 0, got -1"),
        (["--batch", "0"], "batch must be at least 1"),
        (["--lr", "-0.1"], "lr must be at least 0, got -0.1"),
        (["--set", "chunk=0"], "chunk must be at least 1"),
        (["--set", "momentum=1.5"], "momentum must be in [0, 1)"),
        (["--skip-above", "2"], "--skip-above is a probability"),
        (["--order", "correlated", "--dirichlet", "0"], "--dirichlet must be above 0"),
        (["--method", "source, source"], "--method lists source more than once"),
    ],
)
def test_values_no_method_can_run_with_are_one_line_before_any_work(tiny_checkpoint, tmp_path, flags, message):
    """Each of these used to end in a traceback deep in the adaptation loop, or (chunk=0) to be read as the default."""
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", "ttt,ttt-online", *TINY_ADAPT_ARGS, *flags, "--out", tmp_path / "a"])
    assert_one_line_error(result, message)
    assert not (tmp_path / "a").exists()


def test_seeds_report_mean_and_std_per_cell(tiny_checkpoint, tmp_path):
    out = tmp_path / "seeds"
    result = run_cli([
        "adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--corruptions", "fog", "--severities", "5",
        "--method", "source,ttt-online", *TINY_ADAPT_ARGS, "--seeds", "2", "--out", out,
    ])
    assert result.exit_code == 0, result.output
    assert "±" in result.stderr and "seeds" in result.stderr
    table = json.loads((out / "results.json").read_text())["table"]
    assert table["seeds"] == 2 and len(table["per_seed"]) == 2
    assert table["std"]["source"] == [0.0]  # no randomness in the unadapted checkpoint
    online = [grid["ttt-online"][0] for grid in table["per_seed"]]
    assert table["errors"]["ttt-online"][0] == pytest.approx(sum(online) / 2)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {row["seeds"] for row in rows} == {"2"} and "error_std" in rows[0]


def test_zero_seeds_is_one_line(tiny_checkpoint):
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--seeds", "0", "--method", "source"])
    assert_one_line_error(result, "--seeds")


def test_save_adapted_writes_the_online_weights_as_a_checkpoint_adapt_loads(tiny_checkpoint, tmp_path):
    from tta_cli.train.checkpoint import load_model

    saved = tmp_path / "adapted"
    result = run_cli([
        "adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--corruptions", "fog", "--method", "source,ttt-online",
        *TINY_ADAPT_ARGS, "--order", "continual", "--save-adapted", saved,
    ])
    assert result.exit_code == 0, result.output
    assert not (saved / "source").exists()  # episodic: nothing of its own to keep
    adapted, _, meta = load_model(saved / "ttt-online")
    source, _, _ = load_model(tiny_checkpoint)
    assert meta["metrics"]["adapted_by"] == "ttt-online" and meta["metrics"]["adapted_counters"]["updates"] == 20
    changed = [key for key, value in source.state_dict().items() if not torch.equal(value, adapted.state_dict()[key])]
    assert changed and all(key.startswith("encoder.") for key in changed)  # --params encoder moved, nothing else
    again = run_cli(["adapt", "--ckpt", saved / "ttt-online", "--data", "cifar10-mini", "--corruptions", "fog", "--method", "source",
                     "--n", "20", "--device", "cpu"])
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--method", "source,ttt"], "reset after every sample"),
    (["--method", "ttt-online", "--seeds", "2"], "--seeds"),
])
def test_save_adapted_without_an_online_method_or_with_seeds_is_one_line(tiny_checkpoint, tmp_path, flags, fragment):
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, *flags, "--save-adapted", tmp_path / "adapted", "--device", "cpu"])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "adapted").exists()


@pytest.fixture
def unlabelled_folder(tmp_path):
    """A flat folder of 5 unlabelled images of mixed sizes and formats, as a user's photos would be."""
    import numpy as np
    from conftest import write_png
    from PIL import Image

    rng = np.random.default_rng(3)
    root = tmp_path / "photos"
    for index, size in enumerate([(32, 32), (40, 48), (64, 36), (32, 32)]):
        write_png(root / f"photo_{index}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(root / "z last.jpg")
    return root


def test_an_unlabelled_folder_gives_predictions_with_file_names_and_no_error_table(tiny_checkpoint, unlabelled_folder, tmp_path):
    out = tmp_path / "predicted"
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--data", unlabelled_folder, "--method", "source,ttt-online", *TINY_ADAPT_ARGS[2:],
                      "--out", out])
    assert result.exit_code == 0, result.output
    assert "error (%)" not in result.output and "photo_2.png" in result.output
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "predictions.csv", "predictions.json"]
    class_names = yaml.safe_load((tiny_checkpoint / "model.yaml").read_text())["class_names"]
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    files = ["photo_0.png", "photo_1.png", "photo_2.png", "photo_3.png", "z last.jpg"]
    assert [row["file"] for row in rows] == [name for name in files for _ in ("source", "ttt-online")]
    assert [row["method"] for row in rows[:2]] == ["source", "ttt-online"]
    for row in rows:
        assert class_names[int(row["class"])] == row["class_name"] and 0 < float(row["confidence"]) <= 1
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["class_names"] == class_names and [row["file"] for row in saved["predictions"]][::2] == files


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--corruptions", "fog"], "--corruptions"),
    (["--plot", "errors.png"], "--plot"),
    (["--seeds", "2"], "--seeds"),
])
def test_flags_that_need_labels_are_one_line_for_an_unlabelled_folder(tiny_checkpoint, unlabelled_folder, tmp_path, flags, fragment):
    flags = [str(tmp_path / flag) if flag.endswith(".png") else flag for flag in flags]
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--data", unlabelled_folder, "--method", "source", "--device", "cpu", *flags])
    assert_one_line_error(result, fragment, "unlabelled")
