"""The Python API: load a checkpoint, build a method on it, adapt images, keep the adapted weights.

    import tta_cli as tta
    checkpoint = tta.load_checkpoint("runs/quickstart")   # or a packaged name: tta models lists them
    method = tta.build_method("ttt-online", checkpoint, lr=0.001)
    logits = method.adapt(images)          # uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1]
    method.save("runs/adapted")            # a checkpoint folder `tta adapt --ckpt` loads

    checkpoint = tta.from_classifier("resnet18.pth", "runs/resnet18-ttt", recipe="recipes/init-from-classifier.yaml")

The same registry, settings and checks as `tta adapt`: keyword settings are its shared ones (`lr`, `steps`,
`copies`, `params`, `reset`, ...); a method's own ones (`--set tent.lr=...` on the CLI) go in `own={"lr": ...}`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta_cli.config import AdaptSettings, TrainConfig, load_config
from tta_cli.device import resolve_device
from tta_cli.errors import TTAError
from tta_cli.models import TTTModel


@dataclass
class Checkpoint:
    """A trained TTT model with what adapting it needs: its task, training config and class names."""

    model: TTTModel
    task: Any
    config: TrainConfig
    class_names: list[str]
    metrics: dict

    @property
    def image_size(self) -> int:
        return self.config.model.img_size


def load_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    """A `tta train` output folder (or its model.safetensors), or a packaged checkpoint's name (`tta models`, e.g.
    "resnet26_gn.rotation_sun2020_cifar10"), on `device` ("cpu", "cuda", "auto")."""
    from tta_cli.tasks import build_task
    from tta_cli.train.checkpoint import load_model

    model, config, meta = load_model(path, resolve_device(device))
    task = build_task(config.task, config.data.pad_mode)
    return Checkpoint(model.eval(), task, config, list(meta["class_names"]), dict(meta.get("metrics", {})))


def from_classifier(
    weights: str | Path, out: str | Path, recipe: str | Path | None = None, data: str | None = None,
    settings: dict[str, Any] | None = None, device: str = "cpu", force: bool = False,
) -> Checkpoint:
    """`tta train --init`: attach and train a self-supervised head on the classifier in `weights` (a .pth/.pt state
    dict, a .safetensors or a tta checkpoint), write the checkpoint to `out` and load it. `recipe` and `settings`
    (dotted recipe keys: {"model.backbone": "timm_resnet", "optim.epochs": 5}) say the architecture and schedule;
    `data` is a source as `--data` takes. Its metrics hold the classifier's clean accuracy before and after."""
    from tta_cli.config import set_dotted
    from tta_cli.data.sources import load_split
    from tta_cli.train.loop import check_config, train

    overrides: dict[str, Any] = {}
    given = {"data.source": data, "init.weights": str(weights), "out": str(out), "device": device}
    for key, value in {**(settings or {}), **{key: value for key, value in given.items() if value is not None}}.items():
        set_dotted(overrides, key, value)
    config = load_config(TrainConfig, recipe, overrides)
    torch_device = resolve_device(config.device)
    check_config(config, force=force)
    source = config.data
    train_set = load_split(source.source, "train", root=source.root, limit=source.limit_train, seed=config.seed, image_size=config.model.img_size)
    test_set = load_split(source.source, "test", root=source.root, limit=source.limit_test, seed=config.seed, image_size=config.model.img_size)
    train(config, train_set, test_set, torch_device, force=force)
    return load_checkpoint(out, device)


class Adapter:
    """One method on its own copy of a checkpoint's model. `adapt` takes a batch for batch methods (norm, tent),
    a stream in order for online ones (ttt-online: `batch` samples per update) and independent samples for
    episodic ones (ttt); `reset` goes back to the checkpoint's weights."""

    def __init__(self, method, checkpoint: Checkpoint):
        self.method = method
        self.checkpoint = checkpoint

    @property
    def name(self) -> str:
        return self.method.name

    def adapt(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """images uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1] -> logits (N, classes) on the method's device."""
        batch = as_model_input(images, self.checkpoint.image_size, self.method.device)
        if self.method.takes_sequences:
            return self.method.adapt_sequence(batch)
        return self.method.adapt(batch)

    def predict(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class indices (N,) of `images` (adapting on them as `adapt` does)."""
        return self.adapt(images).argmax(1)

    def reset(self) -> None:
        self.method.reset()

    def counters(self) -> dict[str, int]:
        return self.method.counters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapted weights, keyed as the checkpoint's (BatchNorm statistics are the checkpoint's own)."""
        from tta_cli.train.checkpoint import adapted_state

        return adapted_state(self.method.model, self.checkpoint.model)

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write the adapted weights as a checkpoint folder that `load_checkpoint` and `tta adapt --ckpt` read."""
        from tta_cli.train.checkpoint import save_adapted

        out = Path(out)
        if out.exists() and any(out.iterdir()) and not force:
            raise TTAError(f"{out} exists and is not empty; pass force=True to replace its checkpoint")
        out.mkdir(parents=True, exist_ok=True)
        metrics = {**self.checkpoint.metrics, "adapted_by": self.name, "adapted_counters": self.counters()}
        save_adapted(out, self.method.model, self.checkpoint.model, self.checkpoint.config, self.checkpoint.class_names, metrics)
        return out


def build_method(name: str, checkpoint: Checkpoint, own: dict[str, Any] | None = None, **settings: Any) -> Adapter:
    """Method `name` on a copy of `checkpoint`'s model. `settings` are `tta adapt`'s shared settings (lr, steps,
    copies, params, batch, reset, rollback, seed, ...); a keyword the shared settings lack, and `own`, set the
    method's own (e.g. tent's lr). Bad values are TTAErrors with one line, as on the CLI."""
    from tta_cli.adapt.methods import build_method as build_registered

    shared_names = {f.name for f in dataclasses.fields(AdaptSettings)}
    shared = {key: value for key, value in settings.items() if key in shared_names}
    own = {**{key: value for key, value in settings.items() if key not in shared_names}, **(own or {})}
    common = load_config(AdaptSettings, None, {**shared, "methods": [name]})
    common.validate()
    device = next(checkpoint.model.parameters()).device
    method = build_registered(name, checkpoint.model, checkpoint.task, common, len(checkpoint.class_names), device, own)
    return Adapter(method, checkpoint)


def as_model_input(images: np.ndarray | torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1], numpy or torch -> float (N, 3, size, size) on `device`."""
    tensor = torch.as_tensor(images)
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dtype == torch.uint8:
        if tensor.dim() != 4 or tensor.shape[-1] != 3:
            raise TTAError(f"uint8 images must be (N, H, W, 3), got {tuple(tensor.shape)}")
        tensor = tensor.permute(0, 3, 1, 2).float().div(255.0)
    elif not tensor.is_floating_point() or tensor.dim() != 4 or tensor.shape[1] != 3:
        raise TTAError(f"images must be uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1], got {tensor.dtype} {tuple(tensor.shape)}")
    if tuple(tensor.shape[-2:]) != (size, size):
        raise TTAError(f"the checkpoint takes {size}x{size} images, got {tensor.shape[-2]}x{tensor.shape[-1]}")
    return tensor.float().to(device)
