"""`tta stream make` and `tta stream run` end to end: a tiny trained checkpoint on a 100-frame drifting stream."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from tta_cli.stream import open_frames

FRAMES = 100
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tta(*args: str):
    return run_cli(list(args))


def ok(*args: str):
    result = tta(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    """The session's tiny quick-start checkpoint (tests/conftest.py); stream runs only read it."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream")
    ok(
        "stream",
        "make",
        "--out",
        out,
        "--frames",
        FRAMES,
        "--clip-length",
        "10",
        "--segment-clips",
        "3",
        "--corruptions",
        "gaussian_noise,clean,fog",
        "--device",
        "cpu",
        "--seed",
        "1",
    )
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_make_writes_a_video_the_labels_and_the_schedule(stream_dir):
    names = ["frames.npy", "labels.npy", "manifest.json", "schedule.csv", "stream.json", "stream.mp4"]
    assert sorted(path.name for path in stream_dir.iterdir()) == names
    labels = np.load(stream_dir / "labels.npy")
    assert labels.shape == (FRAMES,) and labels.max() < 10
    schedule = read_csv(stream_dir / "schedule.csv")
    assert [int(row["frame"]) for row in schedule] == list(range(FRAMES))
    assert {row["corruption"] for row in schedule} == {"gaussian_noise", "clean", "fog"}
    assert json.loads((stream_dir / "stream.json").read_text())["class_names"][0] == "airplane"
    with open_frames(stream_dir / "stream.mp4", size=32) as video:
        decoded = torch.stack([frame for _, frame in video])
    assert torch.equal(decoded, torch.from_numpy(np.load(stream_dir / "frames.npy")))  # PyAV writes and reads back losslessly


def test_make_without_pyav_is_one_line_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError, as where PyAV is missing
    result = tta("stream", "make", "--out", tmp_path / "stream", "--frames", "10", "--device", "cpu")
    assert result.exit_code == 2 and "--no-video" in one_line(result.output)
    assert not (tmp_path / "stream").exists()


def test_make_refuses_zero_clips_per_segment(tmp_path):
    """0 is a bad value, not "the default": one line, exit 2, no stream written."""
    result = tta("stream", "make", "--out", tmp_path / "s", "--frames", "10", "--segment-clips", "0", "--device", "cpu")
    assert result.exit_code == 2
    assert "clips per corruption must be positive" in one_line(result.output)
    assert not (tmp_path / "s" / "stream.json").exists()


@pytest.mark.parametrize(("flag", "value", "message"), [("--size", "0", "--size must be at least 1"), ("--fps", "0", "--fps must be above 0")])
def test_make_refuses_a_zero_size_or_frame_rate(tmp_path, flag, value, message):
    """--size 0 used to be read as the default size, and --fps 0 was written into the stream for `--fps native`."""
    result = tta("stream", "make", "--out", tmp_path / "s", "--frames", "10", flag, value, "--no-video", "--device", "cpu")
    assert result.exit_code == 2 and message in one_line(result.output)
    assert not (tmp_path / "s" / "stream.json").exists()


def test_make_refuses_to_replace_a_stream_without_force(stream_dir):
    result = tta("stream", "make", "--out", stream_dir, "--frames", "10", "--no-video")
    assert result.exit_code == 2 and "--force" in one_line(result.output)


def test_run_writes_one_row_per_frame_a_summary_and_a_plot(checkpoint, stream_dir, tmp_path):
    out, plot = tmp_path / "run", tmp_path / "timeline.png"
    result = ok("stream", "run", stream_dir / "stream.mp4", "--ckpt", checkpoint, "--copies", "8", "--out", out, "--plot", plot)
    assert "labels: yes" in result.output
    rows = read_csv(out / "frames.csv")
    lines = (out / "frames.jsonl").read_text().splitlines()
    assert len(rows) == len(lines) == FRAMES
    assert [int(row["frame"]) for row in rows] == list(range(FRAMES))
    first = json.loads(lines[0])
    assert {"frame", "time", "class", "confidence", "adapted", "rolled_back", "ssl_loss", "latency_ms", "label", "corruption"} <= set(first)
    assert "file" not in first  # a video's frames have numbers, not file names
    assert [int(row["label"]) for row in rows] == np.load(stream_dir / "labels.npy").tolist()  # found beside the video
    assert all(row["adapted"] == "True" for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    correct = sum(row["correct"] == "True" for row in rows)
    assert summary["frames"] == FRAMES and summary["accuracy"] == pytest.approx(correct / FRAMES)
    assert summary["run"] == "explicit+implicit" and summary["settings"]["copies"] == 8
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"] <= summary["latency_ms"]["max"]
    assert summary["fps"] > 0 and summary["adapted"] == FRAMES and summary["rollbacks"] == 0
    with Image.open(plot) as picture:
        assert picture.format == "PNG" and picture.width > 500


def test_every_source_type_gives_the_same_predictions(checkpoint, stream_dir, tmp_path):
    frames_folder = tmp_path / "pngs"
    frames_folder.mkdir()
    for index, frame in enumerate(np.load(stream_dir / "frames.npy")):
        Image.fromarray(frame).save(frames_folder / f"{index:04d}.png")
    predictions = {}
    for name, source in {
        "video": stream_dir / "stream.mp4",
        "npy": stream_dir / "frames.npy",
        "stream folder": stream_dir,
        "png folder": frames_folder,
    }.items():
        out = tmp_path / name
        ok("stream", "run", source, "--ckpt", checkpoint, "--mode", "none", "--labels", stream_dir / "labels.npy", "--out", out)
        predictions[name] = [(row["class"], row["confidence"]) for row in read_csv(out / "frames.csv")]
    assert len(predictions["video"]) == FRAMES
    assert all(rows == predictions["video"] for rows in predictions.values())


def test_a_folder_of_images_names_each_frame_by_its_file_in_order(checkpoint, tmp_path):
    """Unlabelled frames from image files: each row says which file it classified, in the order they were read."""
    folder = tmp_path / "frames"
    folder.mkdir()
    names = ["b-002.png", "a-010.jpg", "b-001.jpeg", "a-002.png", "c.PNG"]
    pixels = np.random.default_rng(0).integers(0, 256, size=(len(names), 40, 48, 3), dtype=np.uint8)
    for name, frame in zip(names, pixels, strict=True):
        Image.fromarray(frame).save(folder / name)
    out = tmp_path / "run"
    result = ok("stream", "run", folder, "--ckpt", checkpoint, "--copies", "4", "--out", out)
    assert "labels: none" in result.output
    rows = read_csv(out / "frames.csv")
    lines = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    assert [row["file"] for row in rows] == [line["file"] for line in lines] == sorted(names)
    assert [int(row["frame"]) for row in rows] == list(range(len(names)))
    assert list(rows[0])[:2] == ["frame", "file"]


def test_steps_zero_equals_no_adaptation(checkpoint, stream_dir, tmp_path):
    ok("stream", "run", stream_dir, "--ckpt", checkpoint, "--steps", "0", "--lr", "1", "--out", tmp_path / "zero")
    ok("stream", "run", stream_dir, "--ckpt", checkpoint, "--mode", "none", "--out", tmp_path / "none")
    zero, none = read_csv(tmp_path / "zero" / "frames.csv"), read_csv(tmp_path / "none" / "frames.csv")
    assert [(row["class"], row["confidence"]) for row in zero] == [(row["class"], row["confidence"]) for row in none]
    assert not any(row["adapted"] == "True" for row in zero)


def test_save_adapted_writes_the_final_weights_as_a_checkpoint_adapt_loads(checkpoint, stream_dir, tmp_path):
    from tta_cli.train.checkpoint import load_model

    saved = tmp_path / "adapted"
    ok("stream", "run", stream_dir, "--ckpt", checkpoint, "--mode", "implicit", "--max-frames", "12", "--copies", "4", "--lr", "0.01",
       "--save-adapted", saved)
    adapted, _, meta = load_model(saved)
    source, _, _ = load_model(checkpoint)
    assert meta["metrics"]["adapted_frames"] == 12 and meta["metrics"]["adapted_counters"]["updates"] == 12
    changed = [key for key, value in source.state_dict().items() if not torch.equal(value, adapted.state_dict()[key])]
    assert changed and all(key.startswith("encoder.") for key in changed)  # --params encoder moved, nothing else
    ok("adapt", "--ckpt", saved, "--corruptions", "fog", "--n", "10", "--method", "source", "--device", "cpu")


def test_a_packaged_checkpoint_name_works_as_ckpt(stream_dir, tmp_path):
    ok("stream", "run", stream_dir, "--ckpt", "resnet26_gn.rotation_sun2020_cifar10", "--mode", "implicit", "--max-frames", "4",
       "--copies", "2", "--device", "cpu", "--out", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["checkpoint"] == "resnet26_gn.rotation_sun2020_cifar10"


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--compare"], "--compare"),
    (["--mode", "episodic"], "--mode episodic"),
    (["--mode", "none"], "does not adapt"),
])
def test_save_adapted_without_one_adapting_run_is_one_line(checkpoint, stream_dir, tmp_path, flags, fragment):
    result = tta("stream", "run", stream_dir, "--ckpt", checkpoint, *flags, "--save-adapted", tmp_path / "adapted")
    assert result.exit_code == 2 and fragment in one_line(result.output)
    assert not (tmp_path / "adapted").exists()


def test_compare_prints_error_per_run_and_writes_each(checkpoint, stream_dir, tmp_path):
    out = tmp_path / "compare"
    result = ok("stream", "run", stream_dir, "--ckpt", checkpoint, "--compare", "--max-frames", "16", "--copies", "4", "--out", out)
    names = ["none", "episodic", "implicit", "implicit+rollback", "explicit+implicit", "explicit+implicit+rollback"]
    assert "error per run" in result.output and all(name in result.output for name in names)
    summary = json.loads((out / "summary.json").read_text())
    assert [run["run"] for run in summary["runs"]] == names
    assert all(run["frames"] == 16 and run["error"] is not None for run in summary["runs"])
    assert all(len(read_csv(out / f"frames-{name}.csv")) == 16 for name in names)
    assert "vs none: error difference in points, per clip" in result.output


def test_compare_pairs_each_run_with_the_first_per_clip(checkpoint, stream_dir, tmp_path):
    """vs_first is the per-clip error difference to the first run (none), recomputed here from the frame files."""
    out = tmp_path / "compare"
    ok("stream", "run", stream_dir, "--ckpt", checkpoint, "--compare", "--max-frames", "30", "--copies", "4", "--lr", "0.05", "--out", out)
    clips = {row["frame"]: int(row["clip"]) for row in read_csv(stream_dir / "schedule.csv")}

    def per_clip_error(name: str) -> dict[int, float]:
        wrong: dict[int, list[bool]] = {}
        for row in read_csv(out / f"frames-{name}.csv"):
            wrong.setdefault(clips[row["frame"]], []).append(row["correct"] != "True")
        return {clip: float(np.mean(values)) for clip, values in wrong.items()}

    baseline = per_clip_error("none")
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert "vs_first" not in runs[0]
    for run in runs[1:]:
        ours = per_clip_error(run["run"])
        differences = 100.0 * np.array([ours[clip] - baseline[clip] for clip in sorted(baseline)])
        assert run["vs_first"]["baseline"] == "none" and run["vs_first"]["clips"] == 3
        assert run["vs_first"]["points"] == pytest.approx(differences.mean())
        assert run["vs_first"]["standard_error"] == pytest.approx(differences.std(ddof=1) / np.sqrt(3))


def test_fps_paces_the_stream_in_real_time(checkpoint, stream_dir, tmp_path):
    ok(
        "stream",
        "run",
        stream_dir / "frames.npy",
        "--ckpt",
        checkpoint,
        "--mode",
        "none",
        "--fps",
        "200",
        "--max-frames",
        "20",
        "--out",
        tmp_path,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames"] == 20 and summary["seconds"] >= 19 / 200
    assert summary["fps"] <= 200 * 1.05


def test_reset_and_rollback_flags_reach_the_loop(checkpoint, stream_dir, tmp_path):
    ok(
        "stream",
        "run",
        stream_dir,
        "--ckpt",
        checkpoint,
        "--mode",
        "implicit",
        "--reset",
        "every:10",
        "--max-frames",
        "30",
        "--copies",
        "4",
        "--lr",
        "10000",
        "--params",
        "encoder+ssl",
        "--rollback",
        "--out",
        tmp_path,
    )
    rows = read_csv(tmp_path / "frames.csv")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [int(row["frame"]) for row in rows if row["reset"] == "True"][:2] == [10, 20]
    assert summary["rollbacks"] >= 1 and summary["settings"]["rollback"] is True  # an absurd learning rate is undone
    assert summary["settings"]["params"] == "encoder+ssl"


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda stream, tmp: [tmp / "missing.mp4"], "does not exist"),
        (lambda stream, tmp: [stream, "--labels", save(tmp / "labels.npy", np.full(FRAMES, 10))], "label 10 is out of range"),
        (lambda stream, tmp: [stream, "--labels", save(tmp / "labels.npy", np.zeros(FRAMES - 1, dtype=np.int64))], "one label per frame"),
        (lambda stream, tmp: [renamed_classes(stream, tmp)], "differ from"),
        (lambda stream, tmp: [stream, "--mode", "sideways"], "--mode"),
        (lambda stream, tmp: [stream, "--reset", "every:0"], "every"),
        (lambda stream, tmp: [stream / "frames.npy", "--fps", "native"], "no frame rate"),
        (lambda stream, tmp: [stream, "--fps", "fast"], "--fps"),
        (lambda stream, tmp: [stream, "--labels", tmp / "nowhere.npy"], "do not exist"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_2(checkpoint, stream_dir, tmp_path, make_args, message):
    result = tta("stream", "run", *make_args(stream_dir, tmp_path), "--ckpt", checkpoint)
    assert result.exit_code == 2
    assert message in one_line(result.output)


def test_a_missing_checkpoint_gives_one_line_and_exit_2(stream_dir, tmp_path):
    result = tta("stream", "run", stream_dir, "--ckpt", tmp_path)
    assert result.exit_code == 2 and "not a tta checkpoint" in one_line(result.output)


def save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def renamed_classes(stream_dir: Path, tmp_path: Path) -> Path:
    """A copy of the stream whose stream.json names other classes."""
    copy = tmp_path / "renamed"
    copy.mkdir()
    for name in ("frames.npy", "labels.npy", "schedule.csv"):
        (copy / name).write_bytes((stream_dir / name).read_bytes())
    meta = json.loads((stream_dir / "stream.json").read_text())
    meta["class_names"] = [f"class{index}" for index in range(10)]
    (copy / "stream.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("command", [["stream"], ["stream", "make"], ["stream", "run"]])
def test_help_has_examples(command):
    output = ok(*command, "--help").output
    assert "tta stream" in output or "make" in output
    if len(command) == 2:
        assert "Examples" in output and f"tta stream {command[1]}" in output


def test_installed_entry_point_runs_a_stream(checkpoint, stream_dir, tmp_path):
    entry_point = Path(sys.executable).parent / "tta"
    if not entry_point.exists():
        pytest.skip(f"no installed tta entry point next to {sys.executable}")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        str(entry_point),
        "stream",
        "run",
        str(stream_dir / "frames.npy"),
        "--ckpt",
        str(checkpoint),
        "--max-frames",
        "20",
        "--copies",
        "4",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    assert finished.returncode == 0, finished.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames"] == 20 and summary["labelled_frames"] == 20


def test_a_diverged_stream_writes_its_frames_then_ends_as_an_error(checkpoint, stream_dir, tmp_path):
    """An absurd learning rate overflows the weights: the per-frame files show where, and the run exits 2 in one
    line instead of reporting an accuracy over arbitrary classes."""
    out = tmp_path / "run"
    result = tta("stream", "run", stream_dir / "frames.npy", "--ckpt", checkpoint, "--mode", "implicit", "--lr", "1e38", "--out", out)
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith("error: ") and "frames had NaN or infinite predictions" in last
    assert "Traceback" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["nonfinite_frames"] <= summary["frames"] == FRAMES


def test_live_view_says_what_a_slow_first_frame_waits_for():
    from tta_cli.commands.stream import LiveView

    assert "compiling kernels" in LiveView("explicit", 10, ["cat"], "compiling kernels").render(None).plain
    assert LiveView("explicit", 10, ["cat"]).render(None).plain.endswith("starting ...")
