"""Packaged pretrained checkpoints, named as timm names its weights: `<architecture>.<how it was trained>`.

Each is a `tta train` output folder (model.safetensors + model.yaml) shipped inside the package under
`tta_cli/train/pretrained/<name>/`, with card.yaml (what made it: architecture, data, recipe, command, machine)
and README.md (the model card a person reads). Adding one is adding its folder. `--ckpt NAME`,
`tta_cli.load_checkpoint(NAME)` and `tta models` read this registry; a folder or file on disk with the same name
as a packaged model wins over it (write `./NAME` to be explicit either way).
"""

from __future__ import annotations

import difflib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import yaml

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


@dataclass(frozen=True)
class PackagedModel:
    """One shipped checkpoint and the record of how it was made."""

    name: str
    architecture: str  # in words, as model.yaml's config builds it
    data: str  # what it was trained on
    clean_accuracy: float  # % top-1 on the 10,000-image CIFAR-10 test split: model.yaml's test_acc, after the last epoch
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


def read_packaged(folder: Path) -> PackagedModel:
    """The model in `folder`: its card.yaml, and the clean accuracy `tta train` recorded in its model.yaml."""
    card = yaml.safe_load((folder / "card.yaml").read_text())
    accuracy = 100 * yaml.safe_load((folder / "model.yaml").read_text())["metrics"]["test_acc"]
    return PackagedModel(name=folder.name, clean_accuracy=round(accuracy, 2), **card)


MODELS: dict[str, PackagedModel] = {
    folder.name: read_packaged(folder) for folder in sorted(PRETRAINED_DIR.iterdir()) if (folder / "card.yaml").is_file()
}


def packaged_folder(name: str) -> Path | None:
    """The folder of the packaged checkpoint called `name`, or None when no packaged model has that name."""
    model = MODELS.get(str(name))
    return model.folder if model is not None else None


def close_names(text: str) -> list[str]:
    """Packaged names that look like `text` (a mistyped name), for error messages."""
    return difflib.get_close_matches(str(text), list(MODELS), n=2, cutoff=0.6)
