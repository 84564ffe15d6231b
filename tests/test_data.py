"""Image sources: folder trees, archives, the embedded mini set, torchvision's CIFAR-10 batches, the cache."""

from __future__ import annotations

import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tta_cli.data import cifar_binary, load_folder, load_split, sources
from tta_cli.data.cifar_binary import CIFAR10_CLASSES
from tta_cli.errors import TTAError

TINY_CLASSES = ["cat", "dog", "frog"]  # the conftest tiny_folder's classes


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def make_tar(folder: Path, archive: Path, top_folder: str | None = None) -> Path:
    mode = "w:gz" if archive.name.endswith(("gz", "tgz")) else "w"
    with tarfile.open(archive, mode) as tar:
        tar.add(folder, arcname=top_folder or ".")
    return archive


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TTA_CACHE_DIR", str(cache))
    return cache


def test_folder_tree_splits_load_with_sorted_classes_and_exact_pixels(tiny_folder: Path):
    train = load_split(str(tiny_folder), "train")
    test = load_split(str(tiny_folder), "test")
    assert train.images.shape == (12, 32, 32, 3) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 32, 32, 3)
    assert train.class_names == TINY_CLASSES
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(train.images[5].numpy(), read_png(tiny_folder / "train" / "dog" / "01.png"))
    assert train.meta["split"] == "train" and train.meta["path"] == str(tiny_folder)


def test_folder_without_split_level_serves_any_split(tiny_folder: Path):
    class_tree = tiny_folder / "train"
    assert len(load_split(str(class_tree), "train")) == 12
    assert torch.equal(load_split(str(class_tree), "test").images, load_split(str(class_tree), "train").images)


@pytest.mark.parametrize("name, top_folder", [("tree.tar", None), ("tree.tar.gz", "tiny"), ("tree.tgz", "tiny")])
def test_archives_load_like_the_folder(tiny_folder: Path, tmp_path: Path, name: str, top_folder: str | None):
    archive = make_tar(tiny_folder, tmp_path / name, top_folder)
    for split in ("train", "test"):
        from_folder, from_archive = load_split(str(tiny_folder), split), load_split(str(archive), split)
        assert torch.equal(from_archive.images, from_folder.images)
        assert torch.equal(from_archive.labels, from_folder.labels)
        assert from_archive.class_names == from_folder.class_names


@pytest.mark.parametrize("damage", ["truncated", "not-an-archive"])
def test_a_damaged_archive_is_one_line(tiny_folder: Path, tmp_path: Path, damage: str):
    archive = make_tar(tiny_folder, tmp_path / "tree.tar.gz")
    archive.write_bytes(archive.read_bytes()[:100] if damage == "truncated" else b"<html>404 Not Found</html>")  # a bad download
    with pytest.raises(TTAError, match="cannot read archive") as raised:
        load_split(str(archive), "test")
    assert "\n" not in str(raised.value)  # tarfile's message for a non-archive spans lines, one per compression


def test_cifar10_class_folders_keep_cifar10_label_order(tmp_path: Path):
    for class_name in CIFAR10_CLASSES:
        write_png(tmp_path / "tree" / class_name / "0.png", np.zeros((8, 8, 3), np.uint8))
    data = load_split(str(tmp_path / "tree"), "test")
    assert data.class_names == list(CIFAR10_CLASSES)
    assert data.labels.tolist() == list(range(10))


def test_hidden_and_non_image_files_are_ignored(tiny_folder: Path):
    (tiny_folder / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    (tiny_folder / "train" / "cat" / "notes.txt").write_text("not an image")
    write_png(tiny_folder / "__MACOSX" / "train" / "cat" / "00.png", np.zeros((4, 4, 3), np.uint8))
    assert len(load_split(str(tiny_folder), "train")) == 12


def test_embedded_mini_has_500_train_and_100_test_images_per_class():
    train, test = load_split("cifar10-mini", "train"), load_split("cifar10-mini", "test")
    assert train.images.shape == (5000, 32, 32, 3) and test.images.shape == (1000, 32, 32, 3)
    assert train.class_names == test.class_names == list(CIFAR10_CLASSES)
    assert torch.bincount(train.labels).tolist() == [500] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert train.meta["source"] == "cifar10-mini"


def test_shared_archive_counts_limited_load_and_mini_provenance(shared_archive: Path):
    with tarfile.open(shared_archive) as tar:
        folders = Counter(tuple(name.split("/")[:2]) for name in tar.getnames() if name.endswith(".jpg"))
        horse_3 = read_png(tar.extractfile("test/horse/0003.jpg"))
    assert folders == {("train", c): 5000 for c in CIFAR10_CLASSES} | {("test", c): 1000 for c in CIFAR10_CLASSES}
    subset = load_split(str(shared_archive), "test", limit=20)
    assert subset.images.shape == (20, 32, 32, 3) and torch.bincount(subset.labels).tolist() == [2] * 10
    mini_test = load_split("cifar10-mini", "test")
    assert np.array_equal(mini_test.images[CIFAR10_CLASSES.index("horse") * 100 + 3].numpy(), horse_3)


def write_cifar_batches(root: Path, per_batch: int = 4) -> np.ndarray:
    """torchvision's layout with tiny batches; returns the train data rows (N, 3072)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": name.encode()}))
        rows.append(data)
    return np.concatenate(rows[:5])


def test_cifar10_batches_folder_loads_channels_last(tmp_path: Path):
    rows = write_cifar_batches(tmp_path)
    train = load_split("cifar10", "train", root=str(tmp_path))
    assert train.images.shape == (20, 32, 32, 3) and len(load_split("cifar10", "test", root=str(tmp_path))) == 4
    assert train.images[7, 2, 5].tolist() == [rows[7, 2 * 32 + 5], rows[7, 1024 + 2 * 32 + 5], rows[7, 2048 + 2 * 32 + 5]]
    assert train.class_names == list(CIFAR10_CLASSES)
    assert torch.equal(load_split(str(tmp_path), "train").images, train.images)


def test_cifar10_missing_offline_says_what_to_put_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def offline(root: Path) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar_binary, "download_cifar10", offline)
    expected = r"download failed \(OSError: network is unreachable\).*cifar-10-batches-py/data_batch_1\.\.5 and .*test_batch"
    with pytest.raises(TTAError, match=expected):
        load_split("cifar10", "train", root=str(tmp_path))


def test_limit_takes_classes_in_turn_and_depends_on_seed(tiny_folder: Path):
    subset = load_split(str(tiny_folder), "train", limit=6, seed=0)
    assert torch.bincount(subset.labels).tolist() == [2, 2, 2]
    assert torch.equal(load_split(str(tiny_folder), "train", limit=6, seed=0).images, subset.images)
    seeds_differ = any(not torch.equal(load_split(str(tiny_folder), "train", limit=6, seed=s).images, subset.images) for s in range(1, 6))
    assert seeds_differ
    assert len(load_split(str(tiny_folder), "train", limit=100)) == 12


def test_limit_from_cached_split_equals_limit_from_files(tiny_folder: Path, fresh_cache: Path):
    from_files = load_split(str(tiny_folder), "train", limit=5, seed=3)
    load_split(str(tiny_folder), "train")
    from_cache = load_split(str(tiny_folder), "train", limit=5, seed=3)
    assert torch.equal(from_files.images, from_cache.images) and torch.equal(from_files.labels, from_cache.labels)


def test_cache_hit_returns_identical_arrays_without_decoding(tiny_folder: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch):
    first = load_split(str(tiny_folder), "train")
    assert list(fresh_cache.glob("*.images.npy"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(sources, "decode_images", no_decoding)
    second = load_split(str(tiny_folder), "train")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.class_names == first.class_names


def test_changed_source_is_decoded_again(tiny_folder: Path, fresh_cache: Path):
    load_split(str(tiny_folder), "train")
    new_pixels = np.full((32, 32, 3), 7, np.uint8)
    write_png(tiny_folder / "train" / "cat" / "00.png", new_pixels)
    assert np.array_equal(load_split(str(tiny_folder), "train").images[0].numpy(), new_pixels)


def test_image_size_resizes_shorter_side_and_center_crops(tmp_path: Path):
    write_png(tmp_path / "tree" / "a" / "wide.png", np.full((40, 80, 3), 200, np.uint8))
    write_png(tmp_path / "tree" / "b" / "small.png", np.full((16, 16, 3), 50, np.uint8))
    data = load_folder(tmp_path / "tree", image_size=32)
    assert data.images.shape == (2, 32, 32, 3)
    assert data.images[0].unique().tolist() == [200] and data.images[1].unique().tolist() == [50]


def test_load_folder_needs_a_split_only_when_the_tree_has_split_folders(tiny_folder: Path):
    assert len(load_folder(tiny_folder / "test")) == 6
    assert len(load_folder(tiny_folder, split="test")) == 6
    with pytest.raises(TTAError, match="say which split"):
        load_folder(tiny_folder)


@pytest.mark.parametrize(
    "source, message",
    [("no/such/folder", "unknown data source"), ("imagenet", "cifar10-mini")],
)
def test_unknown_sources_are_user_errors(source: str, message: str):
    with pytest.raises(TTAError, match=message):
        load_split(source, "train")


def test_empty_folder_is_a_user_error(tmp_path: Path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(TTAError, match="holds no images"):
        load_split(str(tmp_path / "empty"), "train")


def test_corrupt_image_is_named(tiny_folder: Path):
    (tiny_folder / "train" / "dog" / "02.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(TTAError, match=r"train/dog/02\.png"):
        load_split(str(tiny_folder), "train")


def test_corrupt_jpeg_is_named(tmp_path: Path):
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    for index in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tree" / "cat" / f"{index}.jpg")
    (tmp_path / "tree" / "cat" / "1.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)
    with pytest.raises(TTAError, match=r"cat/1\.jpg"):
        load_split(str(tmp_path / "tree"), "train")


def test_mixed_sizes_name_the_odd_file(tiny_folder: Path):
    write_png(tiny_folder / "test" / "frog" / "odd.png", np.zeros((24, 32, 3), np.uint8))
    with pytest.raises(TTAError, match=r"test/frog/odd\.png is 32x24 .* most images are 32x32"):
        load_split(str(tiny_folder), "test")
    assert load_split(str(tiny_folder), "test", image_size=16).images.shape == (7, 16, 16, 3)


def test_missing_split_folder_lists_what_is_there(tiny_folder: Path):
    for path in sorted((tiny_folder / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tiny_folder / "test").rmdir()
    with pytest.raises(TTAError, match=r"no test/ folder \(found: train\)"):
        load_split(str(tiny_folder), "test")


def test_broken_archive_is_a_user_error(tmp_path: Path):
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(TTAError, match="cannot read archive"):
        load_split(str(tmp_path / "broken.tar.gz"), "train")


@pytest.mark.parametrize("kwargs, message", [({"split": "val"}, "unknown split"), ({"limit": 0}, "positive")])
def test_bad_arguments_are_user_errors(tiny_folder: Path, kwargs: dict, message: str):
    with pytest.raises(TTAError, match=message):
        load_split(str(tiny_folder), **{"split": "train", **kwargs})
