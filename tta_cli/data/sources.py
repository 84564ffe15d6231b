"""Training and clean test images from one `--data` string, decoded once into a cached uint8 ImageSet.

Sources: `cifar10-mini` (embedded 5,000/1,000-image CIFAR-10 subset), `cifar10` (torchvision's
`cifar-10-batches-py` under `root`), a class-folder tree, or a .tar/.tar.gz/.tgz of one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tta_cli.data.cache import cache_key, load_cached, source_identity, store_cached
from tta_cli.data.cifar_binary import find_batches_folder, load_cifar10
from tta_cli.data.folder import SPLITS, decode_images, list_tree, list_unlabelled, read_file, resize_square
from tta_cli.data.imageset import ImageSet
from tta_cli.errors import TTAError

MINI_SOURCE = "cifar10-mini"
MINI_ARCHIVE = Path(__file__).parent / "mini" / "cifar10-mini.tar.gz"
CIFAR10_SOURCE = "cifar10"
DEFAULT_ROOT = "data"


def load_split(
    source: str,
    split: str,
    root: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> ImageSet:
    """One split ("train" | "test") of `source`.

    `limit` keeps a class-balanced subset: classes take turns, each giving its next image in a
    seeded random order, so each class gets limit/classes (+-1) while it has images; the chosen
    images keep their source order. `image_size` resizes the shorter side and center-crops.
    """
    if split not in SPLITS:
        raise TTAError(f"unknown split {split!r}: use train or test")
    if limit is not None and limit < 1:
        raise TTAError(f"limit must be a positive number of images, got {limit}")
    if image_size is not None and image_size < 1:
        raise TTAError(f"image size must be a positive number of pixels, got {image_size}")
    if source == MINI_SOURCE:
        if not MINI_ARCHIVE.is_file():
            raise TTAError(f"the embedded {MINI_SOURCE} archive is missing from this install ({MINI_ARCHIVE}); reinstall tta")
        return _load_tree(MINI_ARCHIVE, split, image_size, limit, seed, MINI_SOURCE)
    if source == CIFAR10_SOURCE:
        return _load_cifar10(Path(root or DEFAULT_ROOT), split, image_size, limit, seed)
    path = Path(source).expanduser()
    if path.is_dir() and find_batches_folder(path) is not None:
        return _load_cifar10(path, split, image_size, limit, seed)
    if path.exists():
        return _load_tree(path, split, image_size, limit, seed, source)
    raise TTAError(
        f"unknown data source {source!r}: use {MINI_SOURCE} (embedded), {CIFAR10_SOURCE} (with --data-root), "
        "or the path of a class-folder tree or of a .tar/.tar.gz of one (no such file or folder here)"
    )


def load_folder(path: str | Path, split: str | None = None, image_size: int | None = None) -> ImageSet:
    """All images of a class-folder tree (or archive); `split` picks train/ or test/ when it has them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TTAError(f"no such file or folder: {path}")
    return _load_tree(path, split, image_size, None, 0, str(path))


def load_unlabelled(path: str | Path, class_names: list[str], image_size: int, limit: int | None = None) -> ImageSet | None:
    """A folder of unlabelled images (folder.list_unlabelled), the first `limit` by file name, resized to `image_size`;
    labels -1, `class_names` those of the checkpoint that will name the predictions, file names in meta["files"].
    None when `path` is not such a folder."""
    files = list_unlabelled(path)
    if files is None:
        return None
    files = files[:limit] if limit else files
    images = decode_images([read_file(file) for file in files], [str(file) for file in files], image_size)
    labels = torch.full((len(files),), -1, dtype=torch.long)
    return ImageSet(images, labels, list(class_names), {"corruption": "unlabelled", "severity": 0, "source": str(path),
                                                        "files": [file.name for file in files]})


def balanced_subset(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Sorted indices of `limit` items, classes taking turns in a seeded order (see load_split)."""
    count = labels.shape[0]
    if limit >= count:
        return torch.arange(count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    shuffled_labels = labels[order]
    by_class = torch.argsort(shuffled_labels, stable=True)
    class_sizes = torch.bincount(shuffled_labels)
    class_starts = torch.cumsum(class_sizes, 0) - class_sizes
    rank_in_class = torch.empty(count, dtype=torch.long)
    rank_in_class[by_class] = torch.arange(count) - class_starts[shuffled_labels[by_class]]
    turn_order = torch.argsort(rank_in_class * count + torch.arange(count))
    return order[turn_order[:limit]].sort().values


def _load_tree(path: Path, split: str | None, image_size: int | None, limit: int | None, seed: int, source: str) -> ImageSet:
    """Cached full split -> subset; else cached subset; else list, decode only what is kept, cache."""
    identity = source_identity(path)
    full_key = cache_key(identity, split, image_size=image_size)
    cached = load_cached(full_key)
    if cached is not None:
        return _finish(_take(cached, limit, seed), source, path, split, limit, seed, image_size)
    subset_key = cache_key(identity, split, image_size=image_size, limit=limit, seed=seed) if limit else full_key
    cached = load_cached(subset_key)
    if cached is not None:
        return _finish(cached, source, path, split, limit, seed, image_size)

    files = list_tree(path, split)
    labels = torch.from_numpy(files.labels)
    positions = balanced_subset(labels, limit, seed) if limit else torch.arange(len(files.names))
    if len(positions) == len(files.names):
        subset_key = full_key
    position_list = positions.tolist()
    images = decode_images(files.read_bytes(position_list), [files.names[p] for p in position_list], image_size)
    data = ImageSet(images, labels[positions], files.class_names)
    store_cached(subset_key, data)
    return _finish(data, source, path, split, limit, seed, image_size)


def _load_cifar10(root: Path, split: str, image_size: int | None, limit: int | None, seed: int) -> ImageSet:
    data = _take(load_cifar10(root, split), limit, seed)
    if image_size is not None:
        data.images = resize_square(data.images, image_size)
    return _finish(data, CIFAR10_SOURCE, root, split, limit, seed, image_size)


def _take(data: ImageSet, limit: int | None, seed: int) -> ImageSet:
    return data.subset(balanced_subset(data.labels, limit, seed)) if limit and limit < len(data) else data


def _finish(data: ImageSet, source: str, path: Path, split: str | None, limit: int | None, seed: int, image_size: int | None) -> ImageSet:
    """Record where the images came from, for reports."""
    data.meta.update(source=source, path=str(path), split=split, limit=limit, seed=seed, image_size=image_size)
    return data
