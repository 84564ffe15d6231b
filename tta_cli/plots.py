"""Every PNG chart of tta (matplotlib, Agg backend), written atomically: adapt's bars, the corruption preview and
the stream timeline. The data behind each comes from its command's own module; only this module imports matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tta_cli.files import atomic_write

if TYPE_CHECKING:
    from tta_cli.stream.report import Timeline

MAX_LABELLED_SEGMENTS = 20  # more corruption segments than this: shade the severity, skip the names


def grouped_bars(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> Path:
    """One group of bars per entry of `groups` (e.g. corruptions), one bar per series (e.g. methods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(6.0, 0.75 * len(groups) * max(1, len(series)) ** 0.5 + 2), 4.2))
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(positions, values, width, label=name)
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(groups, rotation=45, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()

    def save(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")

    try:
        return atomic_write(path, save)
    finally:
        plt.close(figure)


def write_preview(path: Path, clean: np.ndarray, samples: dict[str, dict[int, np.ndarray]], severities: list[int]) -> None:
    """PNG grid: one row per corruption, a clean column then one column per severity, each cell a strip of images."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(samples)
    columns = 1 + len(severities)
    strip_width = 0.45 * max(1, clean.shape[0])
    figure = Figure(figsize=(1.6 + columns * strip_width, 0.3 + 0.55 * len(names)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(names), columns, squeeze=False)
    for row, name in enumerate(names):
        cells = [clean] + [samples[name][severity] for severity in severities]
        for column, images in enumerate(cells):
            axis = axes[row][column]
            axis.imshow(np.concatenate(list(images), axis=1), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title("clean" if column == 0 else f"severity {severities[column - 1]}", fontsize=7)
        axes[row][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    figure.subplots_adjust(left=0.2, right=0.99, top=0.97, bottom=0.01, wspace=0.05, hspace=0.08)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def stream_timeline(path: Path, timeline: Timeline) -> Path:
    """Two panels over the frames: the rolling accuracy (or confidence) and the rolling ssl loss of each run, with
    the shift's severity shaded and the corruption segments named when the schedule is known."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 5.5), dpi=110)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for index, (name, frames, top_curve, ssl_loss) in enumerate(timeline.runs):
        color = f"C{index}"  # one colour per run in both panels
        top.plot(frames, top_curve, label=name, linewidth=1.2, color=color)
        if ssl_loss is not None:
            bottom.plot(frames, ssl_loss, label=name, linewidth=1.2, color=color)
    window = timeline.window
    top.set_ylabel(f"{'accuracy' if timeline.labelled else 'confidence'} (%, last {window} frames)")
    bottom.set_ylabel(f"ssl loss (mean, last {window})")
    bottom.set_xlabel("frame")
    top.set_title("tta stream: online test-time training over the stream")
    if timeline.severity is not None:
        shade_schedule(top, timeline.severity, timeline.segments, name_segments=True)
        shade_schedule(bottom, timeline.severity, timeline.segments, name_segments=False)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="lower left")
    if not bottom.get_legend_handles_labels()[0]:
        bottom.text(0.5, 0.5, "no updates (no adaptation)", transform=bottom.transAxes, ha="center", va="center", color="0.5")
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def shade_schedule(axis, severity: np.ndarray, segments: list[tuple[int, int, str]], name_segments: bool) -> None:
    """Shift severity as a grey area behind the curves (own y axis), segment boundaries, and their names."""
    from matplotlib.transforms import blended_transform_factory

    positions = np.arange(len(severity))
    shade = axis.twinx()
    shade.fill_between(positions, 0, severity, step="mid", color="0.5", alpha=0.18, linewidth=0)
    shade.set_ylim(0, max(5.0, float(severity.max(initial=0.0))) * 1.05)
    shade.set_ylabel("shift severity", color="0.45", fontsize=8)
    shade.set_zorder(axis.get_zorder() - 1)  # the curves stay in front of the shading
    axis.patch.set_visible(False)
    if len(segments) > MAX_LABELLED_SEGMENTS:
        return
    on_top = blended_transform_factory(axis.transData, axis.transAxes)
    for start, stop, name in segments:
        if start:
            axis.axvline(start, color="0.6", linestyle=":", linewidth=0.8)
        if name_segments:
            axis.text((start + stop) / 2, 0.98, name.replace("_", " "), transform=on_top, ha="center", va="top", fontsize=6, color="0.35")
