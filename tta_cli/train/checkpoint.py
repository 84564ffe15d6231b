"""Checkpoints: `model.safetensors` (weights) + `model.yaml` (full config, normalization, class names,
metrics) that `tta adapt`/`tta stream` load, and `resume.pt` (optimizer, epoch, RNG) for `--resume`.
Every file is written atomically, so an interrupted write never damages an existing checkpoint.

Integrity: the weights carry in their safetensors header the SHA-256 of the model-defining part of model.yaml
(config, normalization, class names), so a model.yaml edited after training (e.g. 8 GroupNorm groups to 1, which
keeps every shape) is refused. Checkpoints written before that hash existed load without the check. resume.pt
is read with `torch.load(weights_only=True)`: opening an untrusted run folder cannot run code."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load, save

from tta_cli.config import TrainConfig, from_dict, to_dict, yaml_problem
from tta_cli.errors import TTAError
from tta_cli.files import write_bytes, write_text
from tta_cli.models import TTTModel, build_model
from tta_cli.models.adapters import merged_state
from tta_cli.tasks import build_task

WEIGHTS = "model.safetensors"
META = "model.yaml"
RESUME = "resume.pt"
CONFIG_HASH_KEY = "tta_config_sha256"  # safetensors header metadata: the hash of model.yaml's model-defining part


def save_model(out_dir: Path, model: TTTModel, config: TrainConfig, class_names: list[str], metrics: dict) -> None:
    """Write weights, then the YAML that describes them (the YAML's presence marks a complete checkpoint)."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    meta = {
        "format": "tta-checkpoint/1",
        "config": to_dict(config),
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        "class_names": list(class_names),
        "metrics": metrics,
    }
    meta_text = yaml.safe_dump(meta, sort_keys=False)
    write_bytes(out_dir / WEIGHTS, save(state, metadata={CONFIG_HASH_KEY: config_hash(yaml.safe_load(meta_text))}))
    write_text(out_dir / META, meta_text)


def config_hash(meta: dict[str, Any]) -> str:
    """SHA-256 of what defines the model in model.yaml (config, normalization, class names), as canonical JSON."""
    defining = {key: meta.get(key) for key in ("config", "normalization", "class_names")}
    return hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()


def adapted_state(adapted: torch.nn.Module, source: TTTModel) -> dict[str, torch.Tensor]:
    """`source`'s state keys with `adapted`'s tensors where it has them (a method may drop BatchNorm's running
    statistics, which then stay the source's; low-rank adapters are folded into their convolutions), on the CPU."""
    state = merged_state(adapted)
    return {key: (state[key] if state.get(key) is not None else value).detach().cpu().clone() for key, value in source.state_dict().items()}


def save_adapted(out_dir: Path, adapted: torch.nn.Module, source: TTTModel, config: TrainConfig, class_names: list[str], metrics: dict) -> None:
    """An adapted copy of `source` as a checkpoint under the source's config, so `--ckpt` loads it as any other."""
    model = copy.deepcopy(source).cpu()
    model.load_state_dict(adapted_state(adapted, source))
    save_model(out_dir, model, config, class_names, metrics)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a `tta train` folder, its weights file, or a packaged model's name (tta_cli/train/zoo.py: a path on
    disk of the same name wins); return the folder."""
    from tta_cli.train import zoo

    packaged = zoo.packaged_folder(str(path))
    path = Path(path)
    if packaged is not None and not path.exists():
        if not (packaged / WEIGHTS).is_file():
            raise TTAError(f"the packaged model {path} is missing from this install ({packaged / WEIGHTS}); reinstall tta")
        return packaged
    folder = path.parent if path.suffix == ".safetensors" else path
    if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
        if not path.exists() and len(path.parts) == 1:  # a bare name: perhaps a mistyped packaged one
            close = zoo.close_names(str(path))
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise TTAError(f"{path} is neither a tta checkpoint folder nor a packaged model name; {hint}`tta models` lists the packaged ones")
        raise TTAError(f"{path} is not a tta checkpoint: expected {folder / WEIGHTS} and {folder / META} (made by `tta train`)")
    return folder


def read_bytes(path: Path) -> bytes:
    """A checkpoint file's bytes; unreadable is a one-line error that says why (not "no such file")."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise TTAError(f"cannot read {path}: {error.strerror or error}") from None


def read_meta(path: str | Path) -> dict[str, Any]:
    """model.yaml, checked: a mapping with a config, a normalization of 3 means and 3 positive stds, class names."""
    folder = resolve_checkpoint(path)
    where = folder / META
    try:
        meta = yaml.safe_load(read_bytes(where).decode("utf-8"))
    except UnicodeDecodeError as error:
        raise TTAError(f"{where} is not UTF-8 text (byte {error.start}); the checkpoint description is damaged") from None
    except yaml.YAMLError as error:
        raise TTAError(f"{where} is not valid YAML: {yaml_problem(error)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise TTAError(f"{where} is not a tta checkpoint description (no `config` mapping)")
    norm = meta.get("normalization")
    if not (isinstance(norm, dict) and all(_numbers(norm.get(key), 3) for key in ("mean", "std")) and min(norm["std"]) > 0):
        raise TTAError(f"{where}: `normalization` must hold `mean` and `std`, 3 numbers each (std above 0)")
    names = meta.get("class_names")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(name, str) for name in names) and len(set(names)) == len(names)):
        raise TTAError(f"{where}: `class_names` must list at least 2 distinct class names")
    return meta


def _numbers(values: Any, count: int) -> bool:
    return isinstance(values, list) and len(values) == count and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in values
    )


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[TTTModel, TrainConfig, dict]:
    """Rebuild the architecture from the saved config and load the weights; mismatches are user errors."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    config = from_dict(TrainConfig, meta["config"])
    task = build_task(config.task, config.data.pad_mode)
    norm = meta["normalization"]
    if len(meta["class_names"]) != config.model.num_classes:
        raise TTAError(f"{folder / META} lists {len(meta['class_names'])} class names but its config has {config.model.num_classes} classes")
    model = build_model(config.model, task, norm["mean"], norm["std"])
    data = read_bytes(folder / WEIGHTS)  # bytes, not a path: works for any file name, UTF-8 or not
    try:
        state = load(data)
    except Exception as error:  # safetensors raises several types for damaged files
        raise TTAError(f"cannot read {folder / WEIGHTS}: {' '.join(str(error).split())}; the weights file is damaged") from None
    load_state(model, state, str(folder / WEIGHTS))  # another architecture: the shapes say what differs
    stored = weights_metadata(data).get(CONFIG_HASH_KEY)
    if stored is not None and stored != config_hash(meta):
        raise TTAError(
            f"{folder / META} does not describe {folder / WEIGHTS}: its config, normalization or class names changed after "
            "training (the hash stored with the weights differs); restore the model.yaml written by `tta train`"
        )
    return model.to(device), config, meta


def weights_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's JSON header (empty when absent)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return header.get("__metadata__") or {}


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with a one-line explanation when the checkpoint is for another architecture."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        detail = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or (
            f"{wrong_shape[0]} has shape {tuple(state[wrong_shape[0]].shape)}, model wants {tuple(expected[wrong_shape[0]].shape)}"
        )
        raise TTAError(f"{where} does not match the model architecture ({detail}); was it trained with another backbone/width/split?")
    model.load_state_dict(state)


def save_resume(out_dir: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(out_dir / RESUME, buffer.getvalue())


def load_resume(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RESUME
    if not path.is_file():
        raise TTAError(f"--resume: no {path} to continue from (run without --resume to start fresh)")
    data = read_bytes(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, struct.error) as error:
        reason = " ".join(str(error).split())[:200]
        raise TTAError(f"cannot read {path}: it is damaged or not a tta resume state ({reason}); start again without --resume") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "history"} <= set(state):
        raise TTAError(f"{path} is not a tta resume state (it lacks model, optimizer, epoch or history); start again without --resume")
    return state
