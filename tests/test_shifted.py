"""Readers of shifted test sets: CIFAR-10-C folders, CIFAR-10.1, `tta stream make` folders, shifted class-folder trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_stream_folder

from tta_cli.data.shifted import CIFAR10_CLASSES, is_shifted_root, load_shifted
from tta_cli.errors import TTAError

PER_SEVERITY = 4


def write_fake_c(folder: Path, names=("gaussian_noise", "fog")) -> np.ndarray:
    """A tiny CIFAR-10-C folder: each severity block filled with its own value (10*s + corruption index)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.arange(PER_SEVERITY, dtype=np.uint8) % 10
    np.save(folder / "labels.npy", np.tile(labels, 5))
    for index, name in enumerate(names):
        blocks = [np.full((PER_SEVERITY, 32, 32, 3), 10 * severity + index, dtype=np.uint8) for severity in range(1, 6)]
        np.save(folder / f"{name}.npy", np.concatenate(blocks))
    return labels


@pytest.mark.parametrize("layout", ["CIFAR-10-C", "cifar10_c", "."])
def test_official_layout_slices_each_severity_block(tmp_path, layout):
    labels = write_fake_c(tmp_path / layout)
    sets = load_shifted(tmp_path, severities=(1, 3, 5))
    assert [(s.meta["corruption"], s.meta["severity"]) for s in sets] == [
        ("gaussian_noise", 1),
        ("gaussian_noise", 3),
        ("gaussian_noise", 5),
        ("fog", 1),
        ("fog", 3),
        ("fog", 5),
    ]
    for data in sets:
        index = 0 if data.meta["corruption"] == "gaussian_noise" else 1
        assert data.images.shape == (PER_SEVERITY, 32, 32, 3)
        assert bool((data.images == 10 * data.meta["severity"] + index).all())
        assert data.labels.tolist() == labels.tolist() and str(data.labels.dtype) == "torch.int64"
        assert data.class_names == CIFAR10_CLASSES
        assert data.meta["source"].endswith(f"{data.meta['corruption']}.npy")
    assert is_shifted_root(tmp_path)


def test_n_keeps_the_first_images_of_each_set(tmp_path):
    write_fake_c(tmp_path / "CIFAR-10-C")
    (data,) = load_shifted(tmp_path, corruptions="fog", severities=(4,), n=2)
    assert len(data) == 2 and bool((data.images == 41).all())


def test_explicit_missing_corruption_says_which_file_is_expected(tmp_path):
    write_fake_c(tmp_path / "CIFAR-10-C")
    with pytest.raises(TTAError, match=r"CIFAR-10-C/snow\.npy not found"):
        load_shifted(tmp_path, corruptions="snow")


def test_wrong_shape_is_a_user_error_naming_the_expected_layout(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    write_fake_c(folder)
    np.save(folder / "fog.npy", np.zeros((7, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(TTAError, match=r"expected uint8 \(5\*N, H, W, 3\)"):
        load_shifted(tmp_path, corruptions="fog")


def test_label_count_mismatch_is_a_user_error(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    write_fake_c(folder)
    np.save(folder / "labels.npy", np.zeros(3, dtype=np.uint8))
    with pytest.raises(TTAError, match="labels"):
        load_shifted(tmp_path)


def test_untiled_labels_are_accepted(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    labels = write_fake_c(folder)
    np.save(folder / "labels.npy", labels)
    (data,) = load_shifted(tmp_path, corruptions="gaussian_noise", severities=(5,))
    assert data.labels.tolist() == labels.tolist()


def test_bad_severity_is_a_user_error(tmp_path):
    write_fake_c(tmp_path / "CIFAR-10-C")
    with pytest.raises(TTAError, match="severities"):
        load_shifted(tmp_path, severities=(6,))


def test_meta_json_class_names_win_over_cifar10(tmp_path):
    write_fake_c(tmp_path)
    np.save(tmp_path / "labels.npy", np.load(tmp_path / "labels.npy") % 2)  # labels must be indices of the two classes
    (tmp_path / "meta.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    assert load_shifted(tmp_path, corruptions="fog")[0].class_names == ["a", "b"]


def test_cifar101_is_read_as_severity_0(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "cifar10.1_v6_data.npy", images)
    np.save(tmp_path / "cifar10.1_v6_labels.npy", np.arange(6) % 10)
    assert is_shifted_root(tmp_path)
    (data,) = load_shifted(tmp_path, n=4)
    assert data.meta["corruption"] == "cifar10.1" and data.meta["severity"] == 0 and data.meta["version"] == "v6"
    assert np.array_equal(data.images.numpy(), images[:4]) and data.labels.tolist() == [0, 1, 2, 3]


def test_cifar101_next_to_cifar10c_comes_last_and_can_be_asked_alone(tmp_path):
    write_fake_c(tmp_path / "CIFAR-10-C", names=("fog",))
    np.save(tmp_path / "cifar10.1_v4_data.npy", np.zeros((3, 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "cifar10.1_v4_labels.npy", np.zeros(3, dtype=np.int64))
    assert [s.meta["corruption"] for s in load_shifted(tmp_path)] == ["fog", "cifar10.1"]
    assert [s.meta["corruption"] for s in load_shifted(tmp_path, corruptions="cifar10.1")] == ["cifar10.1"]


def test_missing_folder_and_non_shifted_paths(tmp_path):
    assert not is_shifted_root(tmp_path / "nope")
    assert not is_shifted_root(tmp_path)
    with pytest.raises(TTAError, match="no such folder"):
        load_shifted(tmp_path / "nope")


def test_plain_class_folder_tree_goes_through_the_data_layer(tiny_folder):
    (data,) = load_shifted(tiny_folder / "test", n=4)
    assert len(data) == 4 and data.class_names == ["cat", "dog", "frog"]
    assert data.meta["corruption"] == "test" and data.meta["severity"] == 0


def test_corruption_severity_folders_are_read_per_set(tmp_path, tiny_folder):
    import shutil

    shutil.copytree(tiny_folder / "test", tmp_path / "fog" / "5")
    assert is_shifted_root(tmp_path)
    (data,) = load_shifted(tmp_path, severities=(5,))
    assert (data.meta["corruption"], data.meta["severity"], len(data)) == ("fog", 5, 6)


def test_a_stream_make_folder_is_one_set_of_its_frames_in_order(tmp_path):
    folder = make_stream_folder(tmp_path / "stream")
    assert is_shifted_root(folder)
    (frames,) = load_shifted(folder, corruptions="fog", severities=[5])  # a stream's drift is its own: no selection
    assert frames.meta["corruption"] == "stream" and frames.meta["severity"] == 0
    assert np.array_equal(frames.images.numpy(), np.load(folder / "frames.npy"))
    assert frames.labels.tolist() == np.load(folder / "labels.npy").tolist()
    assert frames.class_names == json.loads((folder / "stream.json").read_text())["class_names"]
    (first,) = load_shifted(folder, n=5)
    assert np.array_equal(first.images.numpy(), np.load(folder / "frames.npy")[:5])


def test_a_stream_folder_with_changed_frames_is_refused(tmp_path):
    folder = make_stream_folder(tmp_path / "stream")
    np.save(folder / "frames.npy", np.load(folder / "frames.npy")[:10])  # fewer frames than its labels and manifest
    with pytest.raises(TTAError, match="frames.npy has .* bytes but its manifest says"):
        load_shifted(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(TTAError, match="has 10 frames but labels for 24"):
        load_shifted(folder)
