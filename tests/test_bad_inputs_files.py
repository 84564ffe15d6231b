"""Bad inputs, part 2: damaged or foreign files. Shifted-set .npy files and labels, checkpoints (model.yaml, weights,
resume.pt) and stream labels are checked where they are read: each problem is one line and exit code 2."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from bad_inputs import assert_one_line_error, invoke, snapshot
from conftest import QUICKSTART, TINY_TRAIN_ARGS


def official_copy(corrupt_folder: Path, tmp_path: Path) -> Path:
    """A manifest-less copy (like the official download), so the content checks themselves are reached."""
    folder = shutil.copytree(corrupt_folder, tmp_path / "CIFAR-10-C")
    (folder / "manifest.json").unlink()
    return folder


def adapt_on(ckpt: Path, data: Path, *extra: str):
    return invoke(["adapt", "--ckpt", ckpt, "--data", data, "--method", "source", "--corruptions", "fog", "--device", "cpu", *extra])


def write_npy_object(path: Path) -> None:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


DATA_DAMAGE = {
    "truncated-npy": (lambda f: (f / "fog.npy").write_bytes((f / "fog.npy").read_bytes()[:5000]), "fog.npy"),
    "garbage-npy": (lambda f: (f / "fog.npy").write_bytes(os.urandom(3000)), "fog.npy"),
    "empty-npy": (lambda f: (f / "fog.npy").write_bytes(b""), "fog.npy"),
    "pickled-npy": (lambda f: write_npy_object(f / "fog.npy"), "fog.npy"),
    "float-images": (lambda f: np.save(f / "fog.npy", np.load(f / "fog.npy").astype(np.float32)), "float32"),
    "float-labels": (lambda f: np.save(f / "labels.npy", np.load(f / "labels.npy").astype(np.float64) + 0.5), "float64"),
    "negative-labels": (lambda f: np.save(f / "labels.npy", np.load(f / "labels.npy").astype(np.int64) - 1), "label -1"),
    "label-255": (lambda f: np.save(f / "labels.npy", np.full(100, 255, dtype=np.uint8)), "label 255"),
    "2d-labels": (lambda f: np.save(f / "labels.npy", np.zeros((100, 2), dtype=np.int64)), "shape (100, 2)"),
    "label-count": (lambda f: np.save(f / "labels.npy", np.load(f / "labels.npy")[:30]), "30 labels"),
    "truncated-labels": (lambda f: (f / "labels.npy").write_bytes((f / "labels.npy").read_bytes()[:100]), "labels.npy"),
}


@pytest.mark.parametrize("damage", list(DATA_DAMAGE))
def test_a_damaged_shifted_set_is_one_line(damage, tiny_checkpoint, corrupt_folder, tmp_path):
    folder = official_copy(corrupt_folder, tmp_path)
    make_damage, fragment = DATA_DAMAGE[damage]
    make_damage(folder)
    assert_one_line_error(adapt_on(tiny_checkpoint, folder), fragment)


def edit_yaml(folder: Path, change) -> None:
    meta = yaml.safe_load((folder / "model.yaml").read_text())
    change(meta)
    (folder / "model.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


CHECKPOINT_DAMAGE = {
    "yaml-bad-bytes": (lambda f: (f / "model.yaml").write_bytes(b"config: \xff\xfe\n"), "not UTF-8"),
    "yaml-not-yaml": (lambda f: (f / "model.yaml").write_text("config: [unclosed\n"), "not valid YAML"),
    "yaml-a-list": (lambda f: (f / "model.yaml").write_text("- 1\n- 2\n"), "not a tta checkpoint description"),
    "no-normalization": (lambda f: edit_yaml(f, lambda m: m.pop("normalization")), "normalization"),
    "two-means": (lambda f: edit_yaml(f, lambda m: m["normalization"].update(mean=[0.5, 0.5])), "normalization"),
    "no-class-names": (lambda f: edit_yaml(f, lambda m: m.pop("class_names")), "class_names"),
    "class-names-count": (lambda f: edit_yaml(f, lambda m: m.update(class_names=m["class_names"][:9])), "class names"),
    "groups-edited": (lambda f: edit_yaml(f, lambda m: m["config"]["model"].update(groups=1)), "changed after training"),
    "truncated-weights": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:999]), "damaged"),
    "garbage-weights": (lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)), "damaged"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_one_line_for_adapt_and_stream(damage, tiny_checkpoint, corrupt_folder, stream_folder, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    make_damage, fragment = CHECKPOINT_DAMAGE[damage]
    make_damage(ckpt)
    assert_one_line_error(adapt_on(ckpt, corrupt_folder), fragment)
    assert_one_line_error(invoke(["stream", "run", stream_folder, "--ckpt", ckpt, "--mode", "none", "--device", "cpu"]), fragment)


def test_an_unreadable_weights_file_says_permission_not_missing(tiny_checkpoint, corrupt_folder, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors").chmod(0)
    if os.access(ckpt / "model.safetensors", os.R_OK):
        pytest.skip("chmod does not deny reads to this user (root)")
    assert_one_line_error(adapt_on(ckpt, corrupt_folder), "Permission denied")


def test_a_checkpoint_under_a_non_utf8_path_loads(tiny_checkpoint, corrupt_folder, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/ckpt-\xff"))
    shutil.copytree(tiny_checkpoint, odd)
    plain, weird = adapt_on(tiny_checkpoint, corrupt_folder), adapt_on(odd, corrupt_folder)
    assert weird.exit_code == 0, weird.output
    assert plain.stdout == weird.stdout


def training_with_resume(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    run = shutil.copytree(tiny_checkpoint, tmp_path / "run")
    for name in ("model.yaml", "model.safetensors"):
        (run / name).unlink()
    return run


def test_a_truncated_resume_state_is_one_line(tiny_checkpoint, tmp_path):
    run = training_with_resume(tiny_checkpoint, tmp_path)
    (run / "resume.pt").write_bytes((run / "resume.pt").read_bytes()[:2000])
    before = snapshot(run)
    assert_one_line_error(invoke(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--out", run, "--resume"]), "resume.pt", "damaged")
    assert snapshot(run) == before


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_resume_state_that_would_run_code_is_refused_unrun(tiny_checkpoint, tmp_path, monkeypatch):
    import torch

    run = training_with_resume(tiny_checkpoint, tmp_path)
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "history": [], "payload": RunsCode()}, run / "resume.pt", pickle_protocol=2)
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--out", run, "--resume"]), "resume.pt")
    assert not (tmp_path / "pwned").exists()


def test_resume_state_without_its_fields_is_one_line(tiny_checkpoint, tmp_path):
    import torch

    run = training_with_resume(tiny_checkpoint, tmp_path)
    torch.save({"epoch": 1}, run / "resume.pt")
    assert_one_line_error(invoke(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--out", run, "--resume"]), "not a tta resume state")


STREAM_LABELS = {
    "float": (np.linspace(0, 9, 12), "float64"),
    "too-large": (np.full(12, 255), "label 255"),
    "below-minus-one": (np.full(12, -2), "label -2"),
    "too-few": (np.zeros(5, dtype=np.int64), "5 labels for 12 frames"),
    "2d": (np.zeros((12, 2), dtype=np.int64), "shape (12, 2)"),
}


@pytest.mark.parametrize("case", list(STREAM_LABELS))
def test_bad_stream_labels_are_one_line(case, tiny_checkpoint, stream_folder, tmp_path):
    labels, fragment = STREAM_LABELS[case]
    np.save(tmp_path / "labels.npy", labels)
    result = invoke(["stream", "run", stream_folder / "frames.npy", "--ckpt", tiny_checkpoint, "--labels", tmp_path / "labels.npy",
                     "--mode", "none", "--device", "cpu"])
    assert_one_line_error(result, fragment)


def test_a_garbage_schedule_is_one_line(tiny_checkpoint, stream_folder, tmp_path):
    (tmp_path / "schedule.csv").write_bytes(b"\xff\xfe garbage\n1,2\n")
    result = invoke(["stream", "run", stream_folder / "frames.npy", "--ckpt", tiny_checkpoint, "--labels", tmp_path / "schedule.csv",
                     "--mode", "none", "--device", "cpu"])
    assert_one_line_error(result, "schedule.csv")


def test_a_damaged_frames_file_is_one_line(tiny_checkpoint, stream_folder, tmp_path):
    (tmp_path / "frames.npy").write_bytes((stream_folder / "frames.npy").read_bytes()[:3000])
    result = invoke(["stream", "run", tmp_path / "frames.npy", "--ckpt", tiny_checkpoint, "--mode", "none", "--device", "cpu"])
    assert_one_line_error(result, "frames.npy")


def test_a_stream_folder_whose_labels_changed_after_making_is_refused(tiny_checkpoint, stream_folder, tmp_path):
    folder = shutil.copytree(stream_folder, tmp_path / "s")
    labels = np.load(folder / "labels.npy")
    np.save(folder / "labels.npy", (labels + 1) % 10)  # same size, other labels
    result = invoke(["stream", "run", folder, "--ckpt", tiny_checkpoint, "--mode", "none", "--device", "cpu"])
    assert_one_line_error(result, "labels.npy", "differs from its manifest")
