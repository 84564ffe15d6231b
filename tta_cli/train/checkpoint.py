"""Checkpoints: `model.safetensors` (weights) + `model.yaml` (full config, normalization, class names,
metrics) that `tta adapt`/`tta stream` load, and `resume.pt` (optimizer, epoch, RNG) for `--resume`.
Every file is written atomically, so an interrupted write never damages an existing checkpoint."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save

from tta_cli.config import TrainConfig, from_dict, to_dict, yaml_problem
from tta_cli.errors import TTAError
from tta_cli.files import write_bytes, write_text
from tta_cli.models import TTTModel, build_model
from tta_cli.tasks import build_task

WEIGHTS = "model.safetensors"
META = "model.yaml"
RESUME = "resume.pt"


def save_model(out_dir: Path, model: TTTModel, config: TrainConfig, class_names: list[str], metrics: dict) -> None:
    """Write weights, then the YAML that describes them (the YAML's presence marks a complete checkpoint)."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    write_bytes(out_dir / WEIGHTS, save(state))
    meta = {
        "format": "tta-checkpoint/1",
        "config": to_dict(config),
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        "class_names": list(class_names),
        "metrics": metrics,
    }
    write_text(out_dir / META, yaml.safe_dump(meta, sort_keys=False))


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a `tta train` folder or its weights file; return the folder."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
        raise TTAError(f"{path} is not a tta checkpoint: expected {folder / WEIGHTS} and {folder / META} (made by `tta train`)")
    return folder


def read_meta(path: str | Path) -> dict[str, Any]:
    folder = resolve_checkpoint(path)
    try:
        meta = yaml.safe_load((folder / META).read_text())
    except yaml.YAMLError as error:
        raise TTAError(f"{folder / META} is not valid YAML: {yaml_problem(error)}") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise TTAError(f"{folder / META} is not a tta checkpoint description")
    return meta


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[TTTModel, TrainConfig, dict]:
    """Rebuild the architecture from the saved config and load the weights; mismatches are user errors."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    config = from_dict(TrainConfig, meta["config"])
    task = build_task(config.task, config.data.pad_mode)
    norm = meta["normalization"]
    model = build_model(config.model, task, norm["mean"], norm["std"])
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as error:  # safetensors raises several types for damaged files
        raise TTAError(f"cannot read {folder / WEIGHTS}: {error}") from None
    load_state(model, state, str(folder / WEIGHTS))
    return model.to(device), config, meta


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
    return torch.load(path, map_location="cpu", weights_only=False)
