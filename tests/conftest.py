"""Shared fixtures: a tiny class-folder tree, the shared CIFAR-10 JPEG archive, a private decode cache."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
TINY_CLASSES = ("cat", "dog", "frog")
TINY_COUNTS = {"train": 4, "test": 2}


@pytest.fixture(scope="session", autouse=True)
def private_decode_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep decoded-image caches out of ~/.cache during tests (one folder per test session)."""
    previous = os.environ.get("TTA_CACHE_DIR")
    os.environ["TTA_CACHE_DIR"] = str(tmp_path_factory.mktemp("tta-cache"))
    yield
    if previous is None:
        os.environ.pop("TTA_CACHE_DIR", None)
    else:
        os.environ["TTA_CACHE_DIR"] = previous


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Save uint8 (H, W, 3) pixels losslessly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """`<root>/{train,test}/{cat,dog,frog}/NN.png`: 4 train + 2 test random 32x32 images per class."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny"
    for split, count in TINY_COUNTS.items():
        for class_name in TINY_CLASSES:
            for index in range(count):
                write_png(root / split / class_name / f"{index:02d}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return root


@pytest.fixture
def cifar_classes_48px(tmp_path: Path) -> Path:
    """`<root>/{train,test}/<CIFAR-10 class>/N.png`: 2 random 48x48 images per class and split, a size no
    checkpoint here was trained on."""
    from tta_cli.data.cifar_binary import CIFAR10_CLASSES

    rng = np.random.default_rng(1)
    root = tmp_path / "cifar48"
    for split in ("train", "test"):
        for class_name in CIFAR10_CLASSES:
            for index in range(2):
                write_png(root / split / class_name / f"{index}.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Per-frame work is tiny: one thread is faster and immune to other processes competing for the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    """The full CIFAR-10 JPEG archive next to the repository, or skip."""
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(f"{SHARED_ARCHIVE} is not here")
    return SHARED_ARCHIVE


# --- the CLI -------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
# The quick-start recipe (depth-8 pre-activation ResNet, GroupNorm, rotation) on 200 + 50 embedded images, 1 epoch.
TINY_TRAIN_ARGS = ["--limit-train", "200", "--limit-test", "50", "--epochs", "1", "--device", "cpu"]


def run_cli(args: list[str]):
    """Invoke the `tta` Typer app in-process; result.stdout / result.stderr are kept apart."""
    from typer.testing import CliRunner

    from tta_cli.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def make_stream_folder(folder: Path, frames: int = 24) -> Path:
    """A `tta stream make` folder of `frames` frames in clips of 6 (each clip one image) from the embedded data."""
    result = run_cli(["stream", "make", "--out", folder, "--frames", str(frames), "--clip-length", "6", "--no-video"])
    assert result.exit_code == 0, result.output
    return folder


@contextlib.contextmanager
def crash_after_epoch(epoch: int):
    """Inside: `tta train` raises RuntimeError right after writing its resume state for `epoch`, as a crash would."""
    from tta_cli.train import checkpoint

    save_resume = checkpoint.save_resume

    def crash(out_dir, state):
        save_resume(out_dir, state)
        if state["epoch"] == epoch:
            raise RuntimeError("simulated crash")

    checkpoint.save_resume = crash
    try:
        yield
    finally:
        checkpoint.save_resume = save_resume


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tta train` checkpoint folder of the tiny quick-start model, trained once per test session.
    Tests that write next to it must copy it first."""
    out = tmp_path_factory.mktemp("tiny-ckpt") / "run"
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--out", out])
    assert result.exit_code == 0, result.output
    return out


class AtomicEverywhere(dict):
    """A choice table for kernels/triton_conv.py (`monkeypatch.setattr(triton_conv, "_CHOSEN", AtomicEverywhere())`)
    that picks an atomic split launch for every operation and shape, where the interpreter's own default and a GPU's
    timing may pick plain ones: so that every zeroed output of a step comes from kernels/zeroed_outputs.py."""

    def __init__(self):
        super().__init__()
        from tta_cli.kernels.triton_conv import GradsLaunch, Launch  # (imported here: TRITON_INTERPRET is read at import)

        self.launches = {
            "forward": Launch(32, 16, 2, atomic=True),
            "input_grad": Launch(32, 16, 2, atomic=True),
            "weight_grad": Launch(32, 32, 0, atomic=True),
            "grads": GradsLaunch(32, 16, 2, 32, 32),
        }

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return self.launches[key[0]]


# --- tiny results for the bad-input suite (tests/test_bad_inputs_*.py): made once, copied before any change ----------


@pytest.fixture(scope="session")
def corrupt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tta corrupt` folder: gaussian_noise and fog on 20 cifar10-mini test images (with its manifest)."""
    out = tmp_path_factory.mktemp("bad-inputs") / "c"
    result = run_cli(["corrupt", "--corruptions", "gaussian_noise,fog", "--n", "20", "--device", "cpu", "--out", out])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def stream_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tta stream make` folder of 12 frames, without video."""
    out = tmp_path_factory.mktemp("bad-inputs") / "s"
    result = run_cli(["stream", "make", "--frames", "12", "--clip-length", "4", "--no-video", "--device", "cpu", "--out", out])
    assert result.exit_code == 0, result.output
    return out
