"""Bad inputs, part 1: where results go. Every command refuses an existing --out without --force, a file given for
a folder (or a folder for a PNG) and a place it cannot write, before any compute; --force replaces a result as a
whole; readers refuse folders that do not match their manifest; a full disk leaves the earlier result intact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import assert_one_line_error, deny_writes, fill, invoke, leftovers, run_tta, snapshot, tmpfs
from conftest import QUICKSTART, TINY_TRAIN_ARGS

COMMANDS = ["adapt", "corrupt", "stream-make", "stream-run", "train"]


@pytest.fixture
def command_args(tiny_checkpoint, corrupt_folder, stream_folder):
    """The arguments (all but --out) of a quick, successful run of each command."""
    return {
        "adapt": ["adapt", "--ckpt", tiny_checkpoint, "--data", corrupt_folder, "--method", "source", "--n", "10", "--device", "cpu"],
        "corrupt": ["corrupt", "--corruptions", "fog", "--n", "10", "--device", "cpu"],
        "stream-make": ["stream", "make", "--frames", "8", "--clip-length", "4", "--no-video", "--device", "cpu"],
        "stream-run": ["stream", "run", stream_folder, "--ckpt", tiny_checkpoint, "--mode", "none", "--device", "cpu"],
        "train": ["train", QUICKSTART, *TINY_TRAIN_ARGS],
    }


def adapt_error(ckpt: Path, data: Path, out: Path, corruption: str = "fog") -> float:
    """`tta adapt --method source` error (%) on one corruption at severity 5 of a shifted folder."""
    args = ["adapt", "--ckpt", ckpt, "--data", data, "--method", "source", "--corruptions", corruption, "--device", "cpu", "--out", out]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())["rows"][0]["error"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_existing_result_is_refused_without_force_and_left_alone(command, command_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    before = snapshot(out)
    assert_one_line_error(invoke([*command_args[command], "--out", out]), str(out), "--force")
    assert snapshot(out) == before


@pytest.mark.parametrize(("command", "other"), [("stream-make", "corrupt"), ("corrupt", "stream-make")])
def test_one_commands_folder_is_never_written_into_by_another(command, other, command_args, corrupt_folder, stream_folder, tmp_path):
    """stream make into a CIFAR-10-C folder destroyed its labels.npy, and the reverse."""
    target = shutil.copytree(corrupt_folder if other == "corrupt" else stream_folder, tmp_path / "theirs")
    before = snapshot(target)
    assert_one_line_error(invoke([*command_args[command], "--out", target]), "--force")
    assert snapshot(target) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_that_is_a_file_is_refused_before_any_compute(command, command_args, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("mine\n")
    before = snapshot(out)
    assert_one_line_error(invoke([*command_args[command], "--out", out]), "is a file")
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["adapt", "corrupt", "stream-make", "stream-run"])
def test_an_out_under_a_file_is_refused(command, command_args, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(invoke([*command_args[command], "--out", tmp_path / "file" / "out"]), "is a file")


@pytest.mark.parametrize(("command", "flag"), [("adapt", "--plot"), ("stream-run", "--plot"), ("corrupt", "--preview")])
def test_a_png_option_given_a_folder_is_refused_before_any_compute(command, flag, command_args, tmp_path):
    (tmp_path / "plots").mkdir()
    assert_one_line_error(invoke([*command_args[command], "--out", tmp_path / "out", flag, tmp_path / "plots"]), "is a folder")
    assert not any((tmp_path / "plots").iterdir()) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "flag"), [("adapt", "--plot"), ("corrupt", "--preview")])
def test_a_png_option_with_another_suffix_or_an_existing_file_is_refused(command, flag, command_args, tmp_path):
    assert_one_line_error(invoke([*command_args[command], "--out", tmp_path / "o1", flag, tmp_path / "plot.txt"]), ".png")
    (tmp_path / "plot.png").write_bytes(b"earlier")
    assert_one_line_error(invoke([*command_args[command], "--out", tmp_path / "o2", flag, tmp_path / "plot.png"]), "--force")
    assert (tmp_path / "plot.png").read_bytes() == b"earlier"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_force_replaces_a_corrupt_folder_as_a_whole_and_adapt_reads_the_truth(tiny_checkpoint, corrupt_folder, tmp_path):
    """The issue's case: fog for 4 images into a folder of gaussian_noise and fog for 20 images used to keep the old
    gaussian_noise.npy beside the new labels.npy, and adapt scored the mix."""
    out = shutil.copytree(corrupt_folder, tmp_path / "c")
    result = invoke(["corrupt", "--corruptions", "fog", "--n", "4", "--device", "cpu", "--out", out, "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == ["fog.npy", "labels.npy", "manifest.json", "meta.json"]
    assert np.load(out / "labels.npy").shape == (20,) and leftovers(tmp_path) == []
    fresh = tmp_path / "fresh"
    assert invoke(["corrupt", "--corruptions", "fog", "--n", "4", "--device", "cpu", "--out", fresh]).exit_code == 0
    assert adapt_error(tiny_checkpoint, out, tmp_path / "a1") == adapt_error(tiny_checkpoint, fresh, tmp_path / "a2")


@pytest.mark.parametrize("foreign", ["notes.txt", "subfolder"])
def test_force_never_replaces_a_folder_that_holds_other_things(foreign, command_args, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / foreign).mkdir() if foreign == "subfolder" else (out / foreign).write_text("keep me")
    before = snapshot(out)
    assert_one_line_error(invoke([*command_args["corrupt"], "--out", out, "--force"]), foreign, "--force only replaces")
    assert snapshot(out) == before


def test_force_replaces_an_adapt_result_and_the_run_writes_a_manifest(command_args, tmp_path):
    out = tmp_path / "a"
    assert invoke([*command_args["adapt"], "--out", out]).exit_code == 0
    first = json.loads((out / "manifest.json").read_text())
    assert set(first["files"]) == {"results.csv", "results.json"} and first["command"] == "tta adapt"
    result = invoke([*command_args["adapt"], "--out", out, "--force", "--predictions"])
    assert result.exit_code == 0, result.output
    assert set(json.loads((out / "manifest.json").read_text())["files"]) == {"results.csv", "results.json", "predictions.csv"}
    assert leftovers(tmp_path) == []


def damage_manifest_folder(folder: Path, damage: str) -> str:
    """Damage a manifest-carrying corrupt folder one way; returns a fragment of the expected error."""
    if damage == "same-size-other-bytes":
        data = np.load(folder / "fog.npy")
        data[0, 0, 0, 0] ^= 0xFF
        np.save(folder / "fog.npy", data)
        return "differs from its manifest"
    if damage == "truncated-labels":
        (folder / "labels.npy").write_bytes((folder / "labels.npy").read_bytes()[:-10])
        return "manifest says"
    if damage == "listed-file-missing":
        (folder / "gaussian_noise.npy").unlink()
        return "missing"
    (folder / "manifest.json").write_text("{not json")
    return "manifest.json"


@pytest.mark.parametrize("damage", ["same-size-other-bytes", "truncated-labels", "listed-file-missing", "garbage-manifest"])
def test_adapt_refuses_a_folder_that_does_not_match_its_manifest(damage, tiny_checkpoint, corrupt_folder, tmp_path):
    data = shutil.copytree(corrupt_folder, tmp_path / "c")
    fragment = damage_manifest_folder(data, damage)
    result = invoke(["adapt", "--ckpt", tiny_checkpoint, "--data", data, "--method", "source", "--corruptions", "fog", "--device", "cpu"])
    assert_one_line_error(result, fragment)


def test_a_folder_without_manifest_like_the_official_download_is_read_alike(tiny_checkpoint, corrupt_folder, tmp_path):
    official = shutil.copytree(corrupt_folder, tmp_path / "CIFAR-10-C")
    (official / "manifest.json").unlink()
    (official / "meta.json").unlink()
    assert adapt_error(tiny_checkpoint, official, tmp_path / "a1") == adapt_error(tiny_checkpoint, corrupt_folder, tmp_path / "a2")


@pytest.mark.parametrize("asked", ["fog", "gaussian_noise"])
def test_a_manifestless_folder_mixing_two_runs_is_refused(asked, tiny_checkpoint, corrupt_folder, tmp_path):
    """The issue's case as an older tta left it: fog and labels.npy of a 4-image re-run beside gaussian_noise.npy of 20
    images (20 labels read as 'N alone' gave gaussian_noise 95% error instead of 55)."""
    mixed = shutil.copytree(corrupt_folder, tmp_path / "mixed")
    (mixed / "manifest.json").unlink()
    picked = np.concatenate([np.arange((s - 1) * 20, (s - 1) * 20 + 4) for s in range(1, 6)])
    np.save(mixed / "labels.npy", np.load(mixed / "labels.npy")[picked])
    np.save(mixed / "fog.npy", np.load(mixed / "fog.npy")[picked])
    result = invoke(["adapt", "--ckpt", tiny_checkpoint, "--data", mixed, "--method", "source", "--corruptions", asked, "--device", "cpu"])
    assert_one_line_error(result, "mixes files of different runs")


def test_manifestless_labels_that_are_not_tiled_are_refused(tiny_checkpoint, corrupt_folder, tmp_path):
    folder = shutil.copytree(corrupt_folder, tmp_path / "untiled")
    (folder / "manifest.json").unlink()
    np.save(folder / "labels.npy", np.random.default_rng(0).integers(0, 10, 100).astype(np.uint8))
    result = invoke(["adapt", "--ckpt", tiny_checkpoint, "--data", folder, "--method", "source", "--corruptions", "fog", "--device", "cpu"])
    assert_one_line_error(result, "tiled 5 times")


def test_a_manifestless_folder_missing_a_listed_corruption_is_refused(tiny_checkpoint, corrupt_folder, tmp_path):
    partial = shutil.copytree(corrupt_folder, tmp_path / "partial")
    (partial / "manifest.json").unlink()
    (partial / "gaussian_noise.npy").unlink()
    result = invoke(["adapt", "--ckpt", tiny_checkpoint, "--data", partial, "--method", "source", "--corruptions", "fog", "--device", "cpu"])
    assert_one_line_error(result, "incomplete")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_folder_is_refused_before_any_compute(command, command_args, tmp_path):
    parent = tmp_path / "locked"
    deny_writes(parent)
    try:
        assert_one_line_error(invoke([*command_args[command], "--out", parent / "out"]), "cannot write")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("command", ["corrupt", "train"])
def test_a_read_only_folder_is_refused_for_root_without_its_override_capability(command, command_args, tmp_path):
    """The real `tta` program as root with CAP_DAC_OVERRIDE dropped (setpriv), so chmod binds as for any user;
    train used to die only after its first epoch."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to drop the capability")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    probe = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
                            f"import os, sys; sys.exit(os.access({str(parent)!r}, os.W_OK))"])
    if probe.returncode != 0:
        pytest.skip("setpriv could not drop CAP_DAC_OVERRIDE here")
    args = [str(arg) for arg in command_args[command]]
    result = run_tta(args + ["--out", str(parent / "out")], prefix=["setpriv", "--bounding-set=-dac_override,-dac_read_search"])
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    assert_one_line_error(result, "cannot write")
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_file_system_is_refused_before_any_compute(command, command_args, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as mount:
        assert_one_line_error(invoke([*command_args[command], "--out", mount / "out"]), "cannot write")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_is_one_line_and_leaves_no_partial_result(command, command_args, tmp_path):
    with tmpfs(tmp_path / "small", "2m") as mount:
        (mount / "out").mkdir()
        (mount / "out" / "results.json").write_text('{"earlier": true}\n')
        fill(mount, 2048)
        before = snapshot(mount / "out")
        result = invoke([*command_args[command], "--out", mount / "out", "--force"])
        line = assert_one_line_error(result)
        # corrupt and stream make know their output's size up front; the others meet the full disk as they write
        assert ("MiB are free" if command in ("corrupt", "stream-make") else "No space left on device") in line
        assert snapshot(mount / "out") == before
        assert leftovers(mount) == []


@pytest.mark.parametrize("command", ["corrupt", "stream-make"])
def test_results_larger_than_the_free_space_are_refused_before_any_compute(command, command_args, tmp_path):
    with tmpfs(tmp_path / "small", "1m") as mount:
        args = {"corrupt": ["corrupt", "--corruptions", "fog,snow", "--n", "200", "--device", "cpu"],
                "stream-make": ["stream", "make", "--frames", "2000", "--no-video", "--device", "cpu"]}[command]
        assert_one_line_error(invoke([*args, "--out", mount / "out"]), "MiB are free")
        assert list(mount.iterdir()) == []


def test_a_disk_that_fills_while_corrupt_writes_leaves_the_earlier_result(corrupt_folder, tmp_path):
    """Room for the images by the up-front estimate, but not for labels, headers, meta.json and the manifest too."""
    with tmpfs(tmp_path / "small", "2m") as mount:
        out = shutil.copytree(corrupt_folder, mount / "out")
        fill(mount, 5 * 10 * 32 * 32 * 3 + 2048)
        before = snapshot(out)
        result = invoke(["corrupt", "--corruptions", "fog", "--n", "10", "--device", "cpu", "--out", out, "--force"])
        assert_one_line_error(result, "No space left on device", "earlier result there is unchanged")
        assert snapshot(out) == before and leftovers(mount) == []
