"""PNG charts for results (matplotlib, Agg backend), written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tta_cli.files import atomic_write


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
