"""What `tta stream run` leaves behind: per-frame rows (CSV + JSONL), a JSON summary, and the curves of the timeline
(plots.py draws them).

Only files, written atomically; the live view and the tables are the CLI's job.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tta_cli.files import write_csv, write_json, write_text
from tta_cli.stream.loop import ROLLING_FRAMES, StreamResult
from tta_cli.stream.make import StreamLabels


def frame_rows(
    result: StreamResult, class_names: list[str], truth: StreamLabels | None = None, file_names: list[str] | None = None
) -> list[dict[str, Any]]:
    """One dict per frame: what was predicted, when, how sure, and what adaptation did on that frame.

    `file` names the frame's image, relative to its folder, when `file_names` are given (FrameSource.file_names);
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
            **({"file": file_names[frame]} if file_names is not None else {}),
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


@dataclass
class Timeline:
    """What `tta stream run --plot` draws (plots.stream_timeline): rolling curves per run over the frames, and the
    shift schedule behind them where it is known."""

    window: int  # frames each rolling mean covers
    labelled: bool  # the top curves are accuracy (else confidence, where no frame is labelled)
    runs: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]  # (name, frame, top curve in %, ssl loss or None)
    severity: np.ndarray | None = None  # (frames,) shift severity
    segments: list[tuple[int, int, str]] = field(default_factory=list)  # corruption_segments of the schedule


def timeline(results: list[StreamResult], truth: StreamLabels | None = None) -> Timeline:
    """Rolling accuracy (rolling confidence without labels) and rolling ssl loss per run, with the schedule's
    severity and corruption segments when it is known."""
    frames = max((len(result) for result in results), default=0)
    window = rolling_window(frames)
    labelled = any((result.columns["label"] >= 0).any() for result in results)
    runs = []
    for result in results:
        columns = result.columns
        if labelled:
            known = columns["label"] >= 0
            top = np.where(known, (columns["predicted"] == columns["label"]).astype(np.float64), np.nan)
        else:
            top = columns["confidence"]
        ssl_loss = rolling_mean(columns["ssl_loss"], window) if np.isfinite(columns["ssl_loss"]).any() else None
        runs.append((result.name, columns["frame"], 100.0 * rolling_mean(top, window), ssl_loss))
    plot = Timeline(window, labelled, runs)
    if truth is not None and truth.severity is not None and frames:
        plot.severity = truth.severity.numpy()[:frames]
        plot.segments = corruption_segments(truth.corruption[:frames] if truth.corruption else [])
    return plot


def corruption_segments(corruption: list[str]) -> list[tuple[int, int, str]]:
    """Runs of one corruption name: (first frame, frame after the last, name)."""
    segments: list[tuple[int, int, str]] = []
    for index, name in enumerate(corruption):
        if segments and segments[-1][2] == name:
            segments[-1] = (segments[-1][0], index + 1, name)
        else:
            segments.append((index, index + 1, name))
    return segments
