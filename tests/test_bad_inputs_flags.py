"""Bad inputs, part 3: flags. Seeds out of range, sizes beyond memory (refused before the allocation), empty lists,
contradictory flags (named both), diverged adaptation that NaN checks miss, and stdin that is empty, closed or
carries another number of frames than there are labels."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import assert_one_line_error, invoke, run_tta
from conftest import QUICKSTART, TINY_TRAIN_ARGS

HUGE_SEED = "99999999999999999999"


@pytest.fixture
def base(tiny_checkpoint, corrupt_folder, stream_folder):
    return {
        "adapt": ["adapt", "--ckpt", tiny_checkpoint, "--data", corrupt_folder, "--method", "source", "--n", "10", "--device", "cpu"],
        "corrupt": ["corrupt", "--corruptions", "fog", "--n", "10", "--device", "cpu"],
        "stream-make": ["stream", "make", "--frames", "8", "--no-video", "--device", "cpu"],
        "stream-run": ["stream", "run", stream_folder, "--ckpt", tiny_checkpoint, "--mode", "none", "--device", "cpu"],
        "train": ["train", QUICKSTART, *TINY_TRAIN_ARGS],
    }


@pytest.mark.parametrize("command", ["adapt", "corrupt", "stream-make", "stream-run", "train"])
@pytest.mark.parametrize("seed", [HUGE_SEED, "-1"])
def test_a_seed_out_of_range_is_one_line(command, seed, base, tmp_path):
    assert_one_line_error(invoke([*base[command], "--seed", seed, "--out", tmp_path / "out"]), "seed", "2**63-1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("command", "flags", "fragment"),
    [
        ("stream-make", ["--frames", "1000000000000"], "--frames"),
        ("stream-make", ["--size", "1000000"], "--size"),
        ("stream-run", ["--window", "1000000000000"], "--window"),
        ("stream-run", ["--copies", "10000000000"], "--copies"),
    ],
)
def test_a_size_beyond_memory_is_refused_before_the_allocation(command, flags, fragment, base, tmp_path):
    assert_one_line_error(invoke([*base[command], *flags, "--out", tmp_path / "out"]), fragment, "memory")


@pytest.mark.parametrize("methods", ["", "source,,ttt", " , "])
def test_an_empty_method_name_is_one_line(methods, base):
    assert_one_line_error(invoke([*base["adapt"], "--method", methods]), "empty name")


@pytest.mark.parametrize(
    ("flags", "first", "second"),
    [
        (["--dirichlet", "0.1"], "--dirichlet", "--order per-corruption"),
        (["--dirichlet", "0.1", "--order", "continual"], "--dirichlet", "--order continual"),
        (["--rollback"], "--rollback", "--method source"),
        (["--reset", "every:5"], "--reset", "--method source"),
        (["--batch", "4"], "--batch", "--method source"),
        (["--skip-above", "0.5"], "--skip-above", "--method source"),
    ],
)
def test_contradictory_adapt_flags_name_both(flags, first, second, base, tmp_path):
    result = invoke([*base["adapt"], *flags, "--out", tmp_path / "out"])
    assert_one_line_error(result, first, second, "contradict")
    assert not (tmp_path / "out").exists()


def test_severities_for_a_clean_source_without_corruptions_is_a_contradiction(tiny_checkpoint):
    args = ["adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--method", "source", "--n", "5", "--severities", "3", "--device", "cpu"]
    assert_one_line_error(invoke(args), "--severities", "--data cifar10-mini without --corruptions")


def test_a_size_that_fails_its_allocation_is_one_line(base):
    """--copies far beyond memory: ttt sizes its chunks itself, so the allocation fails; that is one line too."""
    args = [*base["adapt"], "--method", "ttt", "--copies", "1000000000", "--n", "2"]
    assert_one_line_error(invoke(args), "out of memory")


def test_resume_with_force_is_a_contradiction(tiny_checkpoint, base):
    assert_one_line_error(invoke([*base["train"], "--out", tiny_checkpoint, "--resume", "--force"]), "--resume", "--force")


def test_predictions_without_out_is_one_line(base):
    assert_one_line_error(invoke([*base["adapt"], "--predictions"]), "--predictions", "--out")


@pytest.fixture(scope="module")
def spread_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint predicts one class for everything (one epoch on 200 images), which would hide a collapse:
    here its last layer reads the features' deviations from their mean, so its predictions spread over the classes."""
    import shutil

    import torch
    from safetensors.torch import load, save

    from tta_cli.data.imageset import to_float_nchw
    from tta_cli.data.sources import load_split
    from tta_cli.train.checkpoint import load_model, weights_metadata

    folder = shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("spread") / "ckpt")
    model, _, _ = load_model(folder)
    model.eval()
    seen = []
    hook = model.main_head[1][1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        model(to_float_nchw(load_split("cifar10-mini", "train", limit=200, seed=0).images))
    hook.remove()
    features = seen[0]  # (200, D)
    weight = torch.randn(10, features.shape[1], generator=torch.Generator().manual_seed(0)) / (features.std(0) + 1e-6) / features.shape[1] ** 0.5
    data = (folder / "model.safetensors").read_bytes()
    state = load(data)
    state["main_head.1.1.weight"], state["main_head.1.1.bias"] = weight.contiguous(), -(weight @ features.mean(0)).contiguous()
    (folder / "model.safetensors").write_bytes(save(state, metadata=weights_metadata(data)))
    return folder


def test_an_absurd_learning_rate_that_collapses_the_predictions_is_an_error(spread_checkpoint, tmp_path):
    """--lr 1e9: finite logits, one class for everything (the NaN check alone let it pass with exit 0)."""
    args = ["adapt", "--ckpt", spread_checkpoint, "--data", "cifar10-mini", "--corruptions", "fog", "--n", "20", "--device", "cpu",
            "--method", "source,ttt-online", "--lr", "1e9", "--copies", "2", "--out", tmp_path / "out"]
    assert_one_line_error(invoke(args), "ttt-online", "collapsed", "--lr")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("predicted", "source", "collapsed"),
    [
        ([3] * 19 + [4], list(range(10)) * 2, True),  # adapted: one class; unadapted: spread
        ([3] * 19 + [4], [3] * 20, False),  # the checkpoint itself predicts one class: not the adaptation's doing
        (list(range(10)) * 2, list(range(10)) * 2, False),  # spread
        ([3] * 17 + [4, 5, 6], list(range(10)) * 2, False),  # 85%: below the line
    ],
    ids=["collapsed", "checkpoint-alike", "spread", "85-percent"],
)
def test_the_collapse_rule(predicted, source, collapsed):
    import torch

    from tta_cli.adapt.collapse import check_predictions
    from tta_cli.errors import TTAError

    class Result:
        method, predictions = "tent", torch.tensor(predicted)

    labels = torch.arange(20) % 10
    if collapsed:
        with pytest.raises(TTAError, match="collapsed"):
            check_predictions([Result()], labels, lambda: torch.tensor(source))
    else:
        check_predictions([Result()], labels, torch.tensor(source))


def frames_bytes(count: int) -> bytes:
    return np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8).tobytes()


def test_stdin_with_fewer_labels_than_frames_is_refused(tiny_checkpoint, tmp_path):
    np.save(tmp_path / "labels.npy", np.zeros(5, dtype=np.int64))
    args = ["stream", "run", "-", "--stdin-size", "32x32", "--ckpt", tiny_checkpoint, "--labels", tmp_path / "labels.npy",
            "--mode", "none", "--device", "cpu", "--out", tmp_path / "out"]
    assert_one_line_error(invoke(args, stdin=frames_bytes(10)), "5 labels for 10 frames")
    assert not (tmp_path / "out").exists()


def test_stdin_with_as_many_labels_as_frames_scores_them_all(tiny_checkpoint, tmp_path):
    np.save(tmp_path / "labels.npy", np.arange(10) % 10)
    args = ["stream", "run", "-", "--stdin-size", "32x32", "--ckpt", tiny_checkpoint, "--labels", tmp_path / "labels.npy",
            "--mode", "none", "--device", "cpu", "--out", tmp_path / "out"]
    result = invoke(args, stdin=frames_bytes(10))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["frames"] == 10


def test_an_empty_stdin_is_one_line(tiny_checkpoint, tmp_path):
    args = ["stream", "run", "-", "--stdin-size", "32x32", "--ckpt", tiny_checkpoint, "--mode", "none", "--device", "cpu", "--out", tmp_path / "o"]
    assert_one_line_error(invoke(args, stdin=b""), "no frames")
    assert not (tmp_path / "o").exists()


def test_a_partial_frame_on_stdin_is_one_line(tiny_checkpoint):
    args = ["stream", "run", "-", "--stdin-size", "32x32", "--ckpt", tiny_checkpoint, "--mode", "none", "--device", "cpu"]
    assert_one_line_error(invoke(args, stdin=frames_bytes(2)[:-100]), "inside frame 1")


def test_a_closed_stdin_is_one_line(tiny_checkpoint):
    args = ["stream", "run", "-", "--stdin-size", "32x32", "--ckpt", tiny_checkpoint, "--mode", "none", "--device", "cpu"]
    result = run_tta(args, stdin=subprocess.DEVNULL, pass_fds=(), preexec_fn=lambda: __import__("os").close(0))
    result.stderr, result.stdout = result.stderr.decode(), result.stdout.decode()
    assert_one_line_error(result, "stdin is closed")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["adapt", "--ckpt", "x", "--n", "abc"], "Invalid value for '--n'"),
        (["adapt", "--ckpt", "x", "--bogus"], "No such option: --bogus"),
        (["adapt"], "Missing option '--ckpt'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
    ids=["wrong-type", "unknown-option", "missing-option", "unknown-command"],
)
def test_a_flag_click_cannot_parse_is_one_line_from_the_tta_program(args, fragment):
    result = run_tta(args)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    assert_one_line_error(result, fragment, "--help")
