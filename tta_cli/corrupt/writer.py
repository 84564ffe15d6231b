"""The official CIFAR-10-C layout written from a clean test split: <corruption>.npy (uint8 (5N, H, W, 3),
severities 1..5 stacked), labels.npy (the N labels tiled 5 times) and meta.json. Seeded per severity and chunk,
so a folder is reproducible from its seed whatever the device."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tta_cli.corrupt import SEVERITIES, corrupt
from tta_cli.files import atomic_write, write_json

CHUNK_IMAGES = 10_000  # images per corrupt() call: bounds device memory
PREVIEW_IMAGES = 3  # images per preview cell


def write_sets(
    out: Path, clean, names: list[str], shown_severities: list[int], seed: int, device: torch.device, source: str, order,
    on_written: Callable[[str], None] = lambda name: None,
) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, float]]:
    """labels.npy, one <corruption>.npy per name and meta.json into `out`, calling `on_written(name)` after
    each; returns the preview samples ({name: {severity: images}}) and the seconds each corruption took."""
    count = len(clean)
    labels = clean.labels.numpy()
    label_dtype = np.uint8 if len(clean.class_names) <= 256 else np.int64
    atomic_write(out / "labels.npy", lambda tmp: save_npy(tmp, np.tile(labels.astype(label_dtype), len(SEVERITIES))))

    samples: dict[str, dict[int, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        blocks = [corrupt_all(clean.images, name, severity, seed, device) for severity in SEVERITIES]
        seconds[name] = time.perf_counter() - start
        samples[name] = {severity: blocks[severity - 1][:PREVIEW_IMAGES] for severity in shown_severities}
        stacked = np.concatenate(blocks)  # (5N, H, W, 3)
        atomic_write(out / f"{name}.npy", lambda tmp, stacked=stacked: save_npy(tmp, stacked))
        on_written(name)

    write_json(
        out / "meta.json",
        {
            "tool": "tta corrupt",
            "source": source,
            "images": count,
            "image_shape": list(clean.images.shape[1:]),
            "seed": seed,
            "device": str(device),
            "corruptions": names,
            "severities": list(SEVERITIES),
            "preview_severities": shown_severities,
            "layout": "<corruption>.npy uint8 (5N, H, W, 3): rows (s-1)*N .. s*N-1 hold severity s; labels.npy (5N,) tiled",
            "class_names": clean.class_names,
            "source_order": order,
            "seconds": seconds,
            "images_per_second": {name: len(SEVERITIES) * count / max(secs, 1e-9) for name, secs in seconds.items()},
        },
    )
    return samples, seconds


def corrupt_all(images: torch.Tensor, name: str, severity: int, seed: int, device: torch.device) -> np.ndarray:
    """Corrupt images (N, H, W, 3) in chunks on `device`; returns uint8 numpy (N, H, W, 3)."""
    chunks = []
    for index, start in enumerate(range(0, images.shape[0], CHUNK_IMAGES)):
        chunk = images[start : start + CHUNK_IMAGES].to(device, non_blocking=True)
        chunks.append(corrupt(chunk, name, severity, seed=block_seed(seed, severity, index)).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, *images.shape[1:]), dtype=np.uint8)


def block_seed(seed: int, severity: int, chunk_index: int) -> int:
    """Seed for one severity block / chunk: independent noise per severity and chunk, like the
    original generator's running numpy RNG, yet reproducible from --seed."""
    return zlib.crc32(f"{seed}:severity{severity}:chunk{chunk_index}".encode())


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to an exact path (np.save on a name would append .npy to the temp file)."""
    with open(path, "wb") as handle:
        np.save(handle, array)
