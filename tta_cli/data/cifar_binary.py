"""CIFAR-10 in torchvision's `cifar-10-batches-py` form (pickled numpy batches), read without torchvision."""

from __future__ import annotations

import contextlib
import pickle
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from tta_cli.data.imageset import ImageSet
from tta_cli.errors import TTAError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES_FOLDER = "cifar-10-batches-py"
SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
DOWNLOAD_TIMEOUT_S = 30


def find_batches_folder(path: str | Path) -> Path | None:
    """`path` itself or `path/cifar-10-batches-py` when it holds the first batch file, else None."""
    path = Path(path)
    for candidate in (path, path / BATCHES_FOLDER):
        if (candidate / SPLIT_FILES["train"][0]).is_file() or (candidate / SPLIT_FILES["test"][0]).is_file():
            return candidate
    return None


def load_cifar10(root: str | Path, split: str, download: bool = True) -> ImageSet:
    """Read `<root>/cifar-10-batches-py`; when files are missing, try torchvision's download once."""
    root = Path(root)
    folder = find_batches_folder(root) or root / BATCHES_FOLDER
    missing = [name for name in SPLIT_FILES[split] if not (folder / name).is_file()]
    if missing and download:
        download_error = _try_download(root)
        folder = find_batches_folder(root) or root / BATCHES_FOLDER
        missing = [name for name in SPLIT_FILES[split] if not (folder / name).is_file()]
        if missing:
            raise TTAError(
                f"CIFAR-10 is not in {folder} and the download failed ({download_error}): "
                f"get https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into {root}, "
                f"so that {folder}/data_batch_1..5 and {folder}/test_batch exist; "
                "or use --data cifar10-mini (embedded) or a class-folder path"
            )
    elif missing:
        raise TTAError(f"{folder} lacks {', '.join(missing)}: extract cifar-10-python.tar.gz into {root}")
    images, labels = zip(*(_read_batch(folder / name) for name in SPLIT_FILES[split]), strict=True)
    return ImageSet(
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        class_names=list(CIFAR10_CLASSES),
        meta={"source": "cifar10", "split": split, "path": str(folder)},
    )


def download_cifar10(root: Path) -> None:
    """torchvision's download + checksum + extract into `root` (its progress goes to stderr, not stdout)."""
    from torchvision.datasets import CIFAR10

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            CIFAR10(root=str(root), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _try_download(root: Path) -> str:
    """Returns why the download failed, or '' when it worked."""
    try:
        download_cifar10(root)
    except Exception as error:  # network, checksum, disk: all reported the same actionable way
        return f"{type(error).__name__}: {error}"
    return ""


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 (N, 32, 32, 3) images and int64 (N,) labels."""
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as error:
        raise TTAError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}: {error}); re-extract it") from None
    if labels.shape[0] != data.shape[0] or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(CIFAR10_CLASSES):
        raise TTAError(f"{path}: labels do not match the images or lie outside 0..9; re-extract it")
    return np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels
