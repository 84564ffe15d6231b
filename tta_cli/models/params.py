"""Which parameters of a TTTModel adaptation moves, by group name. The main head never moves."""

from __future__ import annotations

from torch import nn

from tta_cli.config import PARAM_GROUPS
from tta_cli.errors import TTAError
from tta_cli.models.adapters import adapter_parameter_names

NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)


def norm_parameter_names(module: nn.Module, prefix: str) -> list[str]:
    names = []
    for module_name, child in module.named_modules():
        if isinstance(child, NORM_TYPES):
            names += [f"{prefix}{module_name}.{p}" for p, _ in child.named_parameters(recurse=False)]
    return names


def adapted_parameter_names(model: nn.Module, group: str) -> list[str]:
    """encoder: the shared feature extractor (default); encoder+ssl: also the self-supervised head (the
    paper's choice); norm: affine parameters of the encoder's normalization layers only; adapters: the low-rank
    adapters on the encoder's convolutions (models/adapters.py)."""
    if group == "encoder":
        return [f"encoder.{n}" for n, _ in model.encoder.named_parameters()]
    if group == "encoder+ssl":
        return [f"encoder.{n}" for n, _ in model.encoder.named_parameters()] + [
            f"ssl_head.{n}" for n, _ in model.ssl_head.named_parameters()
        ]
    if group == "norm":
        return norm_parameter_names(model.encoder, "encoder.")
    if group == "adapters":  # only the zero-initialised up-projections of models/adapters.py
        names = adapter_parameter_names(model)
        if not names:
            raise TTAError("--params adapters: this model has no adapters (models.adapters.add_adapters adds them)")
        return names
    raise TTAError(f"unknown --params {group!r}; choose one of: {', '.join(PARAM_GROUPS)}")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
