"""What `tta stream run` leaves behind: per-frame rows (CSV + JSONL), a JSON summary and a timeline PNG.

Only files, written atomically; the live view and the tables are the CLI's job.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tta_cli.files import atomic_write, write_csv, write_json, write_text
from tta_cli.stream.loop import ROLLING_FRAMES, StreamResult
from tta_cli.stream.make import StreamLabels

MAX_LABELLED_SEGMENTS = 20  # more corruption segments than this: shade the severity, skip the names


def frame_rows(result: StreamResult, class_names: list[str], truth: StreamLabels | None = None) -> list[dict[str, Any]]:
    """One dict per frame: what was predicted, when, how sure, and what adaptation did on that frame.

    `time` is seconds since the first frame arrived; `ssl_loss` is empty on frames that were not adapted;
    `corruption`/`severity` come from the stream's schedule when it is known.
    """
    columns = result.columns
    start = float(columns["arrival"][0]) if len(result) else 0.0
    rows = []
    for index in range(len(result)):
        frame = int(columns["frame"][index])
        predicted = int(columns["predicted"][index])
        label = int(columns["label"][index])
        row = {
            "frame": frame,
            "time": round(float(columns["arrival"][index]) - start, 6),
            "class": predicted,
            "class_name": class_names[predicted] if predicted < len(class_names) else str(predicted),
            "confidence": round(float(columns["confidence"][index]), 6),
            "label": label if label >= 0 else None,
            "correct": bool(predicted == label) if label >= 0 else None,
            "adapted": bool(columns["adapted"][index]),
            "rolled_back": bool(columns["rolled_back"][index]),
            "reset": bool(columns["reset"][index]),
            "ssl_loss": finite_or_none(round(float(columns["ssl_loss"][index]), 6)),
            "latency_ms": round(float(columns["latency"][index]) * 1000.0, 3),
        }
        if truth is not None and truth.corruption is not None and frame < len(truth.corruption):
            row["corruption"] = truth.corruption[frame]
            row["severity"] = round(float(truth.severity[frame]), 4)
        rows.append(row)
    return rows


def write_frames(out: Path, stem: str, rows: list[dict[str, Any]]) -> list[Path]:
    """`<stem>.csv` and `<stem>.jsonl` under `out`, one row / line per frame."""
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    return [write_csv(out / f"{stem}.csv", rows), write_text(out / f"{stem}.jsonl", lines)]


def paired_difference(result: StreamResult, baseline: StreamResult, truth: StreamLabels | None) -> dict[str, Any] | None:
    """Error of `result` minus error of `baseline`, in points, paired per clip: mean and standard error over the clips
    both runs saw. The frames of one clip show one image, so they are not independent: the clip is the unit, and
    the standard error says how sure the difference is. None without clip ids or with fewer than two clips."""
    if truth is None or truth.clip_ids is None:
        return None
    clip_ids = truth.clip_ids.numpy()

    def per_clip_error(run: StreamResult) -> dict[int, float]:
        frames, labels = run.columns["frame"].astype(np.int64), run.columns["label"]
        keep = (labels >= 0) & (frames < len(clip_ids))
        wrong = (run.columns["predicted"][keep] != labels[keep]).astype(np.float64)
        clips = clip_ids[frames[keep]]
        totals, counts = np.bincount(clips, wrong), np.bincount(clips)
        return {int(c): totals[c] / counts[c] for c in np.flatnonzero(counts)}

    ours, theirs = per_clip_error(result), per_clip_error(baseline)
    shared = sorted(ours.keys() & theirs.keys())
    if len(shared) < 2:
        return None
    differences = 100.0 * np.array([ours[c] - theirs[c] for c in shared])
    return {
        "baseline": baseline.name,
        "points": float(differences.mean()),
        "standard_error": float(differences.std(ddof=1) / math.sqrt(len(shared))),
        "clips": len(shared),
    }


def attach_paired_differences(results: list[StreamResult], truth: StreamLabels | None) -> None:
    """Each run after the first gets `summary["vs_first"]`: its paired difference to the first run (or None), which
    the results table prints and summary.json keeps."""
    for result in results[1:]:
        result.summary["vs_first"] = paired_difference(result, results[0], truth)


def run_record(result: StreamResult) -> dict[str, Any]:
    """A run's summary (accuracy, latency percentiles, fps, counts) with the settings that produced it."""
    return clean_numbers({**result.summary, "settings": dataclasses.asdict(result.settings)})


def write_summary(path: Path, results: list[StreamResult], context: dict[str, Any]) -> Path:
    """One run: its record at the top level; several (--compare): a `runs` list (each later run with `vs_first`,
    see attach_paired_differences). `context` says what ran on what."""
    records = [run_record(result) for result in results]
    body = {**context, **records[0]} if len(records) == 1 else {**context, "runs": records}
    return write_json(path, body)


def frames_stem(result: StreamResult, several: bool) -> str:
    return f"frames-{result.name}" if several else "frames"


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def clean_numbers(value: Any) -> Any:
    """NaN/inf -> None, so the summary is strict JSON (an empty or instant run has no fps or percentiles)."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {key: clean_numbers(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_numbers(item) for item in value]
    return value


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """At each position, the mean of the finite values among the last `window` (NaN where there are none).

    NaN marks "no value here" (an unlabelled frame, a frame that was not adapted), so it is left out, not zeroed.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(0, end - window)
    count = counts[end] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (sums[end] - sums[start]) / np.maximum(count, 1), np.nan)


def rolling_window(frames: int) -> int:
    """The live view's 100 frames, or a tenth of a short stream so the curve still shows a trend."""
    return max(1, min(ROLLING_FRAMES, frames // 10))


def plot_timeline(path: Path, results: list[StreamResult], truth: StreamLabels | None = None) -> Path:
    """PNG: rolling accuracy (rolling confidence without labels) and rolling ssl loss per run over the frames,
    with the shift's severity shaded and the corruption segments named when the schedule is known."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frames = max((len(result) for result in results), default=0)
    window = rolling_window(frames)
    figure = Figure(figsize=(10, 5.5), dpi=110)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    labelled = any((result.columns["label"] >= 0).any() for result in results)
    for index, result in enumerate(results):
        columns, color = result.columns, f"C{index}"  # one colour per run in both panels
        if labelled:
            known = columns["label"] >= 0
            correct = np.where(known, (columns["predicted"] == columns["label"]).astype(np.float64), np.nan)
            top.plot(columns["frame"], 100.0 * rolling_mean(correct, window), label=result.name, linewidth=1.2, color=color)
        else:
            top.plot(columns["frame"], 100.0 * rolling_mean(columns["confidence"], window), label=result.name, linewidth=1.2, color=color)
        if np.isfinite(columns["ssl_loss"]).any():
            bottom.plot(columns["frame"], rolling_mean(columns["ssl_loss"], window), label=result.name, linewidth=1.2, color=color)
    top.set_ylabel(f"{'accuracy' if labelled else 'confidence'} (%, last {window} frames)")
    bottom.set_ylabel(f"ssl loss (mean, last {window})")
    bottom.set_xlabel("frame")
    top.set_title("tta stream: online test-time training over the stream")
    if truth is not None and truth.severity is not None and frames:
        shade_schedule(top, truth, frames, name_segments=True)
        shade_schedule(bottom, truth, frames, name_segments=False)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="lower left")
    if not bottom.get_legend_handles_labels()[0]:
        bottom.text(0.5, 0.5, "no updates (no adaptation)", transform=bottom.transAxes, ha="center", va="center", color="0.5")
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def shade_schedule(axis, truth: StreamLabels, frames: int, name_segments: bool) -> None:
    """Shift severity as a grey area behind the curves (own y axis), segment boundaries, and their names."""
    from matplotlib.transforms import blended_transform_factory

    severity = truth.severity.numpy()[:frames]
    positions = np.arange(len(severity))
    shade = axis.twinx()
    shade.fill_between(positions, 0, severity, step="mid", color="0.5", alpha=0.18, linewidth=0)
    shade.set_ylim(0, max(5.0, float(severity.max(initial=0.0))) * 1.05)
    shade.set_ylabel("shift severity", color="0.45", fontsize=8)
    shade.set_zorder(axis.get_zorder() - 1)  # the curves stay in front of the shading
    axis.patch.set_visible(False)
    segments = corruption_segments(truth.corruption[:frames] if truth.corruption else [])
    if len(segments) > MAX_LABELLED_SEGMENTS:
        return
    on_top = blended_transform_factory(axis.transData, axis.transAxes)
    for start, stop, name in segments:
        if start:
            axis.axvline(start, color="0.6", linestyle=":", linewidth=0.8)
        if name_segments:
            axis.text((start + stop) / 2, 0.98, name.replace("_", " "), transform=on_top, ha="center", va="top", fontsize=6, color="0.35")


def corruption_segments(corruption: list[str]) -> list[tuple[int, int, str]]:
    """Runs of one corruption name: (first frame, frame after the last, name)."""
    segments: list[tuple[int, int, str]] = []
    for index, name in enumerate(corruption):
        if segments and segments[-1][2] == name:
            segments[-1] = (segments[-1][0], index + 1, name)
        else:
            segments.append((index, index + 1, name))
    return segments
