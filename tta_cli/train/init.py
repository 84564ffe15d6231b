"""`tta train --init FILE`: the classifier's weights read from a file (its two phases: phases.py).

Files: a `.pth`/`.pt`/`.bin` state dict (read with `torch.load(weights_only=True)`, so it cannot run code; a dict
holding one under `state_dict`, `model_state_dict` or `model` works too), a `.safetensors`, or a `tta train`
checkpoint (folder or model.safetensors), whose normalization and class names then come along.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load

from tta_cli.config import InitConfig, ModelConfig, TrainConfig, check_range
from tta_cli.errors import TTAError
from tta_cli.models import TTTModel
from tta_cli.models.attach import classifier_classes, load_classifier
from tta_cli.train import checkpoint

WRAPPING_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts commonly keep the state dict


@dataclass
class Classifier:
    """A classifier's weights to start from; a `tta train` checkpoint also gives its model config,
    normalization and class names (None for other files)."""

    state: dict[str, torch.Tensor]
    where: str  # "--init PATH": how error messages name it
    model: ModelConfig | None = None
    normalization: dict | None = None
    class_names: list[str] | None = None


def read_classifier(path: str | Path) -> Classifier:
    """The classifier in `path`; an unreadable file or one without a state dict is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise TTAError(f"--init {path} does not exist; give a classifier's weights file (.pth, .pt, .safetensors) or a tta checkpoint")
    if path.is_dir() or (path.suffix == ".safetensors" and (path.parent / checkpoint.META).is_file()):
        model, config, meta = checkpoint.load_model(path)
        state = {key: value for key, value in model.state_dict().items() if key.startswith(("encoder.", "main_head."))}
        return Classifier(state, f"--init {path}", config.model, meta["normalization"], list(meta["class_names"]))
    data = checkpoint.read_bytes(path)
    if path.suffix == ".safetensors":
        try:
            return Classifier(load(data), f"--init {path}")
        except Exception as error:  # safetensors raises several types for damaged files
            raise TTAError(f"cannot read --init {path}: {' '.join(str(error).split())[:200]}; the weights file is damaged") from None
    return Classifier(state_dict_in(torch_load(data, path), path), f"--init {path}")


def torch_load(data: bytes, path: Path):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # weights_only refuses arbitrary objects, such as a pickled nn.Module
            raise TTAError(f"--init {path} holds pickled objects, not only weights; save the classifier's model.state_dict() instead") from None
        raise TTAError(f"cannot read --init {path}: it is damaged or not a PyTorch weights file ({' '.join(str(error).split())[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, struct.error) as error:
        reason = " ".join(str(error).split())[:200]
        raise TTAError(f"cannot read --init {path}: it is damaged or not a PyTorch weights file ({reason})") from None


def state_dict_in(loaded, path: Path) -> dict[str, torch.Tensor]:
    """`loaded` itself when it maps names to tensors, else the state dict under one of WRAPPING_KEYS."""
    for candidate in (loaded, *(loaded.get(key) for key in WRAPPING_KEYS if isinstance(loaded, dict))):
        if isinstance(candidate, dict) and candidate and all(isinstance(v, torch.Tensor) for v in candidate.values()):
            return dict(candidate)
    raise TTAError(f"--init {path} holds no state dict (a mapping of layer names to tensors, as model.state_dict() gives)")


def check_init(config: TrainConfig, classifier: Classifier, task) -> None:
    """The classifier fits `config.model` (architecture; the class count is checked with the data) and the
    init settings are usable. Fails before any data is read."""
    from tta_cli.models import build_model

    settings = config.init
    check_range("init.ssl_epochs", settings.ssl_epochs, 0)
    check_range("init.joint_lr", settings.joint_lr, 0)
    for name in ("mean", "std"):
        values = getattr(settings, name)
        if values is not None and (len(values) != 3 or (name == "std" and min(values) <= 0)):
            raise TTAError(f"init.{name} must be 3 numbers, one per RGB channel in [0, 1]{' (above 0)' if name == 'std' else ''}, got {values}")
    if classifier.model is not None:
        ours, theirs = dataclasses.replace(config.model, num_classes=0), dataclasses.replace(classifier.model, num_classes=0)
        if ours != theirs:
            changed = next(f.name for f in dataclasses.fields(ours) if getattr(ours, f.name) != getattr(theirs, f.name))
            raise TTAError(f"{classifier.where} has model.{changed}={getattr(theirs, changed)!r}, the recipe "
                           f"{getattr(ours, changed)!r}; set model.{changed} to the classifier's")
    classes = classifier_classes(classifier.state, config.model.backbone) or config.model.num_classes
    as_built = dataclasses.replace(config.model, num_classes=classes)  # the class count is checked against the data later
    load_classifier(build_model(as_built, task), classifier.state, as_built, classifier.where)


def check_classes(classifier: Classifier, config: TrainConfig, class_names: list[str]) -> None:
    """The classifier outputs the data's classes (and, for a tta checkpoint, the same names in the same order)."""
    if classifier.class_names is not None and classifier.class_names != list(class_names):
        raise TTAError(f"{classifier.where} was trained on classes {classifier.class_names}, the data has {list(class_names)}")
    classes = classifier_classes(classifier.state, config.model.backbone)
    if classes is not None and classes != len(class_names):
        raise TTAError(f"{classifier.where} is a classifier of {classes} classes but the data has {len(class_names)}; "
                       "use data with the classifier's classes")


def init_metrics(before: dict, after: dict) -> dict:
    """The classifier's clean accuracy before --init and after training, and what changed."""
    return {"init_test_acc_before": before["test_acc"], "init_test_acc_after": after["test_acc"],
            "init_test_acc_change": after["test_acc"] - before["test_acc"]}


def normalization(settings: InitConfig, classifier: Classifier, data_mean: list[float], data_std: list[float]) -> tuple[list, list]:
    """The input normalization the classifier was trained with: init.mean/std when set, else a tta checkpoint's
    own, else the training set's statistics."""
    known = classifier.normalization or {"mean": data_mean, "std": data_std}
    return settings.mean or known["mean"], settings.std or known["std"]
