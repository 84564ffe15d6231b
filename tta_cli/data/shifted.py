"""Readers for distribution-shifted test sets: CIFAR-10-C (official download or `tta corrupt`
output), CIFAR-10.1, a `tta stream make` folder, and class-folder trees of shifted images, each as ImageSets with
meta = {"corruption", "severity", "source"}.

Layouts (see data/README.md): `<root>/CIFAR-10-C/<corruption>.npy` uint8 (5*N, H, W, 3) with
severities 1..5 stacked in blocks of N rows and `labels.npy` (5*N,) (the N labels tiled 5 times;
N alone is accepted too); the alias `<root>/cifar10_c/`; or `<root>` itself. CIFAR-10.1:
`cifar10.1_v6_data.npy` (or v4) uint8 (M, 32, 32, 3) + `cifar10.1_v6_labels.npy` (M,).

Trust: a folder written by `tta corrupt` carries manifest.json (tta_cli/outputs.py); its files must match it (sizes;
SHA-256 of the files read), else it is refused. A folder without one (the official download, an older tta) is
accepted when it is consistent: every <corruption>.npy in it (not only those asked for) holds as many rows as
labels.npy covers, every label is a class index, and the corruptions a meta.json lists are all there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from tta_cli.data.imageset import ImageSet
from tta_cli.data.labels import as_class_indices
from tta_cli.errors import TTAError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
C_FOLDERS = ("CIFAR-10-C", "cifar10_c")
CIFAR101_VERSIONS = ("v6", "v4")
CIFAR101 = "cifar10.1"
SEVERITY_COUNT = 5


def _corruption_names() -> tuple[str, ...]:
    from tta_cli.corrupt import ALL_CORRUPTIONS

    return ALL_CORRUPTIONS


def _c_folder(root: Path) -> Path | None:
    """The folder holding `<corruption>.npy` + labels.npy: an official name under root, or root."""
    for name in C_FOLDERS:
        if (root / name / "labels.npy").is_file():
            return root / name
    if (root / "labels.npy").is_file() and any((root / f"{name}.npy").is_file() for name in _corruption_names()):
        return root
    return None


def _cifar101_files(root: Path) -> tuple[Path, Path, str] | None:
    for folder in (root, root / "CIFAR-10.1"):
        for version in CIFAR101_VERSIONS:
            data = folder / f"cifar10.1_{version}_data.npy"
            if data.is_file():
                return data, folder / f"cifar10.1_{version}_labels.npy", version
    return None


def _severity_folders(root: Path) -> list[tuple[str, int, Path]]:
    """ImageNet-C style trees `<root>/<corruption>/<severity>/<class>/*.png`."""
    found = []
    for name in _corruption_names():
        for severity in range(1, SEVERITY_COUNT + 1):
            folder = root / name / str(severity)
            if folder.is_dir():
                found.append((name, severity, folder))
    return found


def _is_stream_folder(root: Path) -> bool:
    """A `tta stream make` output: frames.npy with its labels and stream.json."""
    return all((root / name).is_file() for name in ("frames.npy", "labels.npy", "stream.json"))


def is_shifted_root(path: str | Path) -> bool:
    """Does `path` hold CIFAR-10-C style .npy files, CIFAR-10.1, a `tta stream make` stream, or `<corruption>/<severity>/`
    folders?"""
    root = Path(path).expanduser()
    if not root.is_dir():
        return False
    return _c_folder(root) is not None or _cifar101_files(root) is not None or _is_stream_folder(root) or bool(_severity_folders(root))


def load_shifted(
    root: str | Path,
    corruptions: Iterable[str] | str | None = None,
    severities: Iterable[int] = (5,),
    n: int | None = None,
) -> list[ImageSet]:
    """One ImageSet per (corruption, severity) found under `root`, plus CIFAR-10.1 when present.

    `corruptions=None` takes every corruption whose file is there (and CIFAR-10.1); names may
    include "cifar10.1". `n` keeps the first n images of each set. A plain class-folder tree is
    read whole by the data layer as one set (corruption = folder name, severity 0). A `tta stream make` folder is one
    set of its frames in order (corruption "stream", severity 0): its drift has its own schedule, so `corruptions` and
    `severities` do not apply to it.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TTAError(f"no such folder: {root} (expected a CIFAR-10-C folder, CIFAR-10.1 files or a shifted class-folder tree)")
    severities = _check_severities(severities)
    if n is not None and n < 1:
        raise TTAError(f"n must be a positive number of images, got {n}")
    if _is_stream_folder(root) and _c_folder(root) is None:
        return [_load_stream_folder(root, n)]
    wanted = _wanted(corruptions)
    sets: list[ImageSet] = []
    c_folder = _c_folder(root)
    cifar101 = _cifar101_files(root)
    severity_folders = _severity_folders(root)
    if c_folder is not None:
        sets += _load_c_folder(c_folder, wanted, severities, n)
    elif severity_folders:
        sets += _load_severity_folders(root, severity_folders, wanted, severities, n)
    elif wanted and wanted != {CIFAR101}:
        raise TTAError(
            f"no CIFAR-10-C files under {root}: expected {root}/CIFAR-10-C/<corruption>.npy (or {root}/cifar10_c/ "
            f"or {root}/<corruption>.npy) next to labels.npy, as written by `tta corrupt --out {root}`"
        )
    if cifar101 is not None and (wanted is None or CIFAR101 in wanted):
        sets.append(_load_cifar101(*cifar101, n))
    elif wanted and CIFAR101 in wanted:
        raise TTAError(f"no CIFAR-10.1 under {root}: expected {root}/cifar10.1_v6_data.npy and cifar10.1_v6_labels.npy (or v4)")
    if not sets:
        if c_folder is None and cifar101 is None and not severity_folders:
            return [_load_class_folder(root, n)]
        raise TTAError(f"none of the requested corruptions were found under {root}")
    return sets


def _check_severities(severities: Iterable[int]) -> list[int]:
    if isinstance(severities, int):
        severities = [severities]
    checked = sorted(set(severities))
    if not checked or any(isinstance(s, bool) or s not in range(1, SEVERITY_COUNT + 1) for s in checked):
        raise TTAError(f"severities must be among 1, 2, 3, 4, 5; got {list(severities)}")
    return checked


def _wanted(corruptions: Iterable[str] | str | None) -> set[str] | None:
    """None = whatever is there; else the resolved names (plus "cifar10.1" when asked)."""
    if corruptions is None:
        return None
    from tta_cli.corrupt import resolve_corruptions

    tokens = [corruptions] if isinstance(corruptions, str) else list(corruptions)
    parts = [part.strip() for token in tokens for part in token.split(",") if part.strip()]
    wanted = {part.lower() for part in parts if part.lower() == CIFAR101}
    rest = [part for part in parts if part.lower() != CIFAR101]
    if rest or not wanted:
        wanted.update(resolve_corruptions(rest))
    return wanted


def _class_names(folder: Path) -> list[str]:
    """`tta corrupt` records its source's class names in meta.json; the official set is CIFAR-10."""
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        try:
            names = json.loads(meta_path.read_text()).get("class_names")
        except (OSError, ValueError, AttributeError):
            names = None
        if isinstance(names, list) and names:
            return [str(name) for name in names]
    return list(CIFAR10_CLASSES)


def open_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """np.load with every way a damaged or foreign file fails (truncated, 0 bytes, garbage, pickled, unreadable)
    as one TTAError."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        reason = getattr(error, "strerror", None) or " ".join(str(error).split()) or type(error).__name__
        raise TTAError(f"cannot read {path}: {reason}; it is not a complete .npy array (damaged or truncated?)") from None


def _load_c_folder(folder: Path, wanted: set[str] | None, severities: list[int], n: int | None) -> list[ImageSet]:
    from tta_cli.outputs import verify_manifest

    present = [name for name in _corruption_names() if (folder / f"{name}.npy").is_file()]
    names = [name for name in _corruption_names() if wanted is None or name in wanted]
    if wanted is None:
        names = present
        if not names:
            raise TTAError(f"{folder} has labels.npy but no <corruption>.npy files (e.g. {folder}/gaussian_noise.npy)")
    missing = [name for name in names if name not in present]
    if missing:
        raise TTAError(
            f"{folder / missing[0]}.npy not found: expected uint8 (5*N, H, W, 3) with severities 1..5 stacked "
            f"(official CIFAR-10-C: (50000, 32, 32, 3)); make it with `tta corrupt --corruptions {missing[0]} --out DIR`"
        )
    manifest = verify_manifest(folder, hashed=["labels.npy", *(f"{name}.npy" for name in names)])
    labels_path = folder / "labels.npy"
    class_names = _class_names(folder)
    labels = as_class_indices(open_npy(labels_path, mmap=False), str(labels_path), len(class_names))
    arrays = {name: _c_array(folder / f"{name}.npy", len(labels)) for name in (names if manifest else present)}
    if manifest is None:
        _check_listed(folder, present)
        _check_one_run(folder, arrays, labels)
    sets = []
    for name in names:
        images = arrays[name]
        per_severity = images.shape[0] // SEVERITY_COUNT
        keep = per_severity if n is None else min(n, per_severity)
        for severity in severities:
            start = (severity - 1) * per_severity
            label_start = start if labels.shape[0] == images.shape[0] else 0
            sets.append(
                ImageSet(
                    torch.from_numpy(np.array(images[start : start + keep])),
                    torch.from_numpy(labels[label_start : label_start + keep].copy()),
                    class_names,
                    {"corruption": name, "severity": severity, "source": str(folder / f"{name}.npy")},
                )
            )
    return sets


def _c_array(path: Path, label_count: int) -> np.ndarray:
    """One <corruption>.npy, memory-mapped, checked against the layout and the labels' count."""
    images = open_npy(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] % SEVERITY_COUNT or not images.shape[0]:
        raise TTAError(
            f"{path} is {images.dtype} {tuple(images.shape)}; expected uint8 (5*N, H, W, 3) with severities 1..5 "
            "stacked in blocks of N rows (official CIFAR-10-C: (50000, 32, 32, 3))"
        )
    per_severity = images.shape[0] // SEVERITY_COUNT
    if label_count not in (images.shape[0], per_severity):
        raise TTAError(
            f"{path.parent / 'labels.npy'} has {label_count} labels but {path} has {images.shape[0]} images; "
            f"expected {images.shape[0]} (the {per_severity} labels tiled 5 times) or {per_severity}: the folder mixes "
            "files of different runs"
        )
    return images


def _check_one_run(folder: Path, arrays: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Without a manifest: every corruption file has the same number of rows, and labels of that length are the same
    N labels tiled 5 times. A folder that mixes runs of different sizes fails here, even when the labels' count
    fits one of its files."""
    rows = {name: images.shape[0] for name, images in arrays.items()}
    if len(set(rows.values())) > 1:
        (first, count), (other, other_count) = sorted(rows.items(), key=lambda item: item[1])[:: len(rows) - 1]
        raise TTAError(
            f"{folder} mixes files of different runs: {first}.npy has {count} images but {other}.npy has {other_count}; "
            "make the folder again with one `tta corrupt` run"
        )
    per_severity = len(labels) // SEVERITY_COUNT
    if rows and len(labels) == next(iter(rows.values())) and not (labels.reshape(SEVERITY_COUNT, per_severity) == labels[:per_severity]).all():
        raise TTAError(f"{folder / 'labels.npy'} is not one set of {per_severity} labels tiled 5 times: the folder mixes files of different runs")


def _check_listed(folder: Path, present: list[str]) -> None:
    """Without a manifest: a `tta corrupt` meta.json lists its corruptions; one missing means an interrupted run."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return
    try:
        listed = json.loads(meta_path.read_text()).get("corruptions") or []
    except (OSError, ValueError, AttributeError):
        raise TTAError(f"cannot read {meta_path}: it is not a JSON object; the folder is damaged") from None
    absent = [name for name in listed if name not in present]
    if absent:
        raise TTAError(f"{meta_path} lists {absent[0]} but {folder / absent[0]}.npy is missing: the folder is incomplete; make it again")


def _load_cifar101(data_path: Path, labels_path: Path, version: str, n: int | None) -> ImageSet:
    if not labels_path.is_file():
        raise TTAError(f"{labels_path} not found: CIFAR-10.1 needs it next to {data_path.name}")
    images = open_npy(data_path)
    labels = as_class_indices(open_npy(labels_path, mmap=False), str(labels_path), len(CIFAR10_CLASSES))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise TTAError(f"{data_path} is {images.dtype} {tuple(images.shape)}; expected uint8 (M, 32, 32, 3)")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise TTAError(f"{labels_path} has shape {tuple(labels.shape)}; expected ({images.shape[0]},) to match {data_path.name}")
    keep = images.shape[0] if n is None else min(n, images.shape[0])
    return ImageSet(
        torch.from_numpy(np.array(images[:keep])),
        torch.from_numpy(np.array(labels[:keep]).astype(np.int64)),
        list(CIFAR10_CLASSES),
        {"corruption": CIFAR101, "severity": 0, "source": str(data_path), "version": version},
    )


def _load_severity_folders(
    root: Path, found: list[tuple[str, int, Path]], wanted: set[str] | None, severities: list[int], n: int | None
) -> list[ImageSet]:
    from tta_cli.data.sources import load_folder

    chosen = [(name, severity, folder) for name, severity, folder in found if (wanted is None or name in wanted) and severity in severities]
    if wanted is not None:
        missing = sorted((wanted - {CIFAR101}) - {name for name, _, _ in chosen})
        if missing:
            raise TTAError(f"no folders {root}/<corruption>/<severity>/ for {', '.join(missing)} at severities {severities}")
    sets = []
    for name, severity, folder in chosen:
        data = load_folder(folder)
        if n is not None:
            data = data.subset(slice(0, n))
        data.meta.update(corruption=name, severity=severity, source=str(folder))
        sets.append(data)
    return sets


def _load_stream_folder(root: Path, n: int | None) -> ImageSet:
    """A `tta stream make` folder's frames (T, S, S, 3) and per-frame labels, checked against its manifest."""
    from tta_cli.stream.make import load_stream_labels
    from tta_cli.stream.sources import open_frames_npy

    truth = load_stream_labels(root)  # verifies the manifest of the label files
    frames_path = root / "frames.npy"
    frames = open_frames_npy(frames_path)
    if truth.labels.shape[0] != frames.shape[0]:
        raise TTAError(f"{root} has {frames.shape[0]} frames but labels for {truth.labels.shape[0]}: make the stream again")
    class_names = truth.class_names or list(CIFAR10_CLASSES)
    labels = as_class_indices(truth.labels.numpy(), f"the labels of {root}", len(class_names))
    keep = frames.shape[0] if n is None else min(n, frames.shape[0])
    return ImageSet(
        torch.from_numpy(np.array(frames[:keep])),
        torch.from_numpy(labels[:keep]),
        list(class_names),
        {"corruption": "stream", "severity": 0, "source": str(frames_path)},
    )


def _load_class_folder(root: Path, n: int | None) -> ImageSet:
    from tta_cli.data.sources import load_folder

    data = load_folder(root)
    if n is not None:
        data = data.subset(slice(0, n))
    data.meta.update(corruption=root.name, severity=0, source=str(root))
    return data
