"""The registry of adaptation methods: one module per method, each registered by name with `@register`.

Adding a method is one module here (a `Method` subclass with `@register`) and its import at the bottom of this
file; a test or plugin may also register one from outside. The CLI's choices, help text and the semantics in
results.json are read from REGISTRY.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.views import ViewAveraged
from tta_cli.config import from_dict
from tta_cli.errors import TTAError
from tta_cli.models.adapters import add_adapters

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as `--method cls.name`."""
    if not dataclasses.is_dataclass(cls.Settings):
        raise TypeError(f"{cls.__name__}.Settings must be a dataclass")
    REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise TTAError(f"unknown method {name!r}; choose from: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def method_settings(name: str, values: dict[str, Any] | None = None):
    """The method's own Settings: its defaults, overridden by `values` (from `--set name.field=value`)."""
    return from_dict(method_class(name).Settings, values or {}, f"{name}.")


def split_method_settings(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(shared settings, {method: its own settings}) from one nested dict of a recipe and `--set` overrides."""
    shared = {key: value for key, value in values.items() if key not in REGISTRY}
    own = {key: value or {} for key, value in values.items() if key in REGISTRY}
    return shared, own


def build_method(name: str, model: torch.nn.Module, task, settings, classes: int, device: torch.device,
                 own: dict[str, Any] | Any | None = None) -> Method:
    """A fresh copy of the model behind method `name`, so methods never see each other's changes. `settings` holds
    the shared settings (AdaptSettings); `own`, the method's Settings or a dict of overrides of its defaults. With
    `--params adapters` the copy gets adapters (models/adapters.py); with `--views K` the method is view-averaged."""
    cls = method_class(name)
    if not isinstance(own, cls.Settings):
        own = method_settings(name, own)
    model = copy.deepcopy(model).to(device)
    if cls.moves_params and settings.params == "adapters":
        add_adapters(model, settings.adapter_rank)
    method = cls(model, task, own, settings, classes, device)
    views = getattr(settings, "views", 1)
    return ViewAveraged(method, views) if views > 1 and name != "ttaug" else method  # ttaug averages views itself


def help_lines(width: int = 74) -> list[str]:
    """One line per method for `tta adapt --help`: its name and the start of its semantics' first clause."""
    lines = []
    for name, cls in REGISTRY.items():
        line = f"{name:<11} {cls.semantics.split('. ')[0].rstrip('.')}"
        lines.append(line if len(line) <= width else line[: width - 3].rstrip(" ,") + "...")
    return lines


from tta_cli.adapt.methods import cotta, eata, memo, norm, sar, source, tent, ttaug, ttt, ttt_nn, ttt_online  # noqa: E402,F401  (registers them)
