"""Decode once: decoded uint8 arrays kept as `.npy` in `~/.cache/tta/` (or `$TTA_CACHE_DIR`).

An entry is keyed by a hash of the source's absolute path, its size and mtime (for a folder: file
count, total size and newest mtime of everything under it), the split, the resize and the subset,
so editing the source makes a new entry. Each file is written atomically; the `.json` goes last and
marks the entry complete. A cache that cannot be written (read-only home) is skipped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from tta_cli.data.imageset import ImageSet
from tta_cli.files import atomic_write, write_json

CACHE_ENV = "TTA_CACHE_DIR"
FORMAT_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tta")


def fingerprint(path: str | Path) -> list:
    """[size, mtime_ns] of a file; [file count, total size, newest mtime_ns] of a folder tree."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    count = total_size = newest = 0
    for folder, _, names in os.walk(path):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            count, total_size, newest = count + 1, total_size + stat.st_size, max(newest, stat.st_mtime_ns)
    return [count, total_size, newest]


def source_identity(path: str | Path) -> list:
    """Absolute path + fingerprint: computed once per load, shared by the keys of its entries."""
    path = Path(path).resolve()
    return [str(path), fingerprint(path)]


def cache_key(identity: list, split: str | None, **options: object) -> str:
    """Hash of what determines the decoded array; `options` holds image_size, limit, seed..."""
    fields = [FORMAT_VERSION, identity, split, sorted(options.items())]
    return hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:32]


def load_cached(key: str) -> ImageSet | None:
    """The stored ImageSet, or None when absent or unreadable."""
    folder = cache_dir()
    try:
        info = json.loads((folder / f"{key}.json").read_text())
        images = np.load(folder / f"{key}.images.npy")
        labels = np.load(folder / f"{key}.labels.npy")
    except (OSError, ValueError):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
        return None
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), info["class_names"], info["meta"])


def store_cached(key: str, data: ImageSet) -> None:
    """Write the entry; a failure to write only loses the speed-up."""
    folder = cache_dir()
    try:
        _save_npy(folder / f"{key}.images.npy", data.images.numpy())
        _save_npy(folder / f"{key}.labels.npy", data.labels.numpy())
        write_json(folder / f"{key}.json", {"class_names": data.class_names, "meta": data.meta})
    except OSError:
        return


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)
