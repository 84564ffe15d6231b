"""Label checks at the data boundary: whatever file the labels come from, they are whole class indices of the
checkpoint's classes, one per image or frame."""

from __future__ import annotations

import numpy as np

from tta_cli.errors import TTAError


def as_class_indices(labels: np.ndarray, where: str, classes: int | None = None, unknown_allowed: bool = False) -> np.ndarray:
    """int64 copy of `labels` (N,) after checking: integers (float files are refused, not truncated), in
    [0, classes) when `classes` is known, or -1 for "unknown" where `unknown_allowed` (stream frames)."""
    if labels.ndim != 1:
        raise TTAError(f"{where} has shape {tuple(labels.shape)}; labels are one integer per image, shape (N,)")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TTAError(f"{where} holds {labels.dtype} values; labels must be integer class indices")
    if len(labels) == 0:
        raise TTAError(f"{where} holds no labels")
    values = np.asarray(labels).astype(np.int64)
    low = -1 if unknown_allowed else 0
    smallest, largest = int(values.min()), int(values.max())
    if smallest < low:
        allowed = "class indices from 0, or -1 for an unlabelled frame" if unknown_allowed else "class indices from 0"
        raise TTAError(f"{where}: label {smallest} is not a class index; labels must be {allowed}")
    if classes is not None and largest >= classes:
        raise TTAError(f"{where}: label {largest} is out of range: there are {classes} classes (labels 0 to {classes - 1})")
    return values
