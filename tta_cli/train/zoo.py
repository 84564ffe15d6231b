"""Packaged pretrained checkpoints, named as timm names its weights: `<architecture>.<how it was trained>`.

Each is a `tta train` output folder (model.safetensors + model.yaml) shipped inside the package under
`tta_cli/train/pretrained/<name>/`, registered here with what made it (recipe, command, machine) and what it
measured. `--ckpt NAME`, `tta_cli.load_checkpoint(NAME)` and `tta models` read this registry; a folder or file on
disk with the same name as a packaged model wins over it (write `./NAME` to be explicit either way).
"""

from __future__ import annotations

import difflib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


@dataclass(frozen=True)
class PackagedModel:
    """One shipped checkpoint and the record of how it was made."""

    name: str
    architecture: str  # in words, as model.yaml's config builds it
    data: str  # what it was trained on
    clean_accuracy: float  # % top-1 on the 10,000-image CIFAR-10 test split, as `tta train` measured it after the last epoch
    recipe: str  # the recipe file in recipes/
    command: str  # the command that made it
    trained: str  # machine and date

    @property
    def folder(self) -> Path:
        return PRETRAINED_DIR / self.name

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"

    def size_bytes(self) -> int:
        return self.weights.stat().st_size

    def parameters(self) -> int:
        """Numbers stored in the weights (parameters and GroupNorm/BatchNorm buffers), read from the safetensors header."""
        with open(self.weights, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


ARCHIVE = "the 50,000 CIFAR-10 training images of the CIFAR-10 JPEG archive"

MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="resnet26_gn.rotation_sun2020_cifar10",
            architecture="pre-activation ResNet-26 (width 1), GroupNorm 8 groups, split after layer2, rotation head on all 4 rotations",
            data=f"{ARCHIVE} (quality ~75; data/README.md)",
            clean_accuracy=87.73,
            recipe="recipes/sun2020-rotation-gn.yaml",
            command="tta train recipes/sun2020-rotation-gn.yaml --data cifar10-jpeg.tar.gz --out runs/sun2020",
            trained="one NVIDIA H200, 2026-12-03, 413 s",
        ),
        PackagedModel(
            name="resnet26_bn.rotation_reflect_cifar10",
            architecture="pre-activation ResNet-26 (width 1), BatchNorm, split after layer2, rotation head on all 4 rotations",
            data=f"{ARCHIVE}, reflect-padded crops",
            clean_accuracy=89.17,
            recipe="recipes/rotation-bn-fast.yaml",
            command="tta train recipes/rotation-bn-fast.yaml --data cifar10-jpeg.tar.gz --out runs/rotation-bn",
            trained="one NVIDIA H200, 2026-12-03, 240 s",
        ),
        PackagedModel(
            name="resnet26_bn.supervised_reflect_cifar10",
            architecture="pre-activation ResNet-26 (width 1), BatchNorm, classifier only (its rotation head is untrained)",
            data=f"{ARCHIVE}, reflect-padded crops",
            clean_accuracy=88.49,
            recipe="recipes/supervised-bn.yaml",
            command="tta train recipes/supervised-bn.yaml --data cifar10-jpeg.tar.gz --out runs/supervised-bn",
            trained="one NVIDIA H200, 2026-12-03, 148 s",
        ),
    )
}


def packaged_folder(name: str) -> Path | None:
    """The folder of the packaged checkpoint called `name`, or None when no packaged model has that name."""
    model = MODELS.get(str(name))
    return model.folder if model is not None else None


def close_names(text: str) -> list[str]:
    """Packaged names that look like `text` (a mistyped name), for error messages."""
    return difflib.get_close_matches(str(text), list(MODELS), n=2, cutoff=0.6)
