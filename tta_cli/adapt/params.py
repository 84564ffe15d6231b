"""Which parameters adaptation moves, and the update both TTT methods apply to them. The main head never moves."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tta_cli.errors import TTAError

PARAM_GROUPS = ("encoder", "encoder+ssl", "norm")
PER_SAMPLE = ("auto", "vmap", "grouped")
NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)


@dataclass
class UpdateConfig:
    """The ssl update of episodic and online TTT: `steps` SGD steps (`lr`, `momentum`) on `copies` augmented
    views of the input, moving the `params` group."""

    steps: int = 1
    lr: float = 0.001
    copies: int = 32
    momentum: float = 0.0
    params: str = "encoder"
    # How copies with their own weights (episodic samples, parallel online streams) are computed: "vmap" (torch.func,
    # any model) or "grouped" (the CIFAR pre-activation ResNet with rotation folded into grouped convolutions:
    # engine/grouped.py; other models keep vmap). Equal results (float64-tested). "auto": the faster on the device
    # (grouped on the CPU, vmap on CUDA: docs/speed-notes.md).
    per_sample: str = "auto"


def check_per_sample(config: UpdateConfig) -> None:
    """A one-line user error for an unknown `per_sample`, raised before any work (build_methods builds every
    method first)."""
    if config.per_sample not in PER_SAMPLE:
        raise TTAError(f"unknown per_sample {config.per_sample!r}; choose one of: {', '.join(PER_SAMPLE)}")


def norm_parameter_names(module: nn.Module, prefix: str) -> list[str]:
    names = []
    for module_name, child in module.named_modules():
        if isinstance(child, NORM_TYPES):
            names += [f"{prefix}{module_name}.{p}" for p, _ in child.named_parameters(recurse=False)]
    return names


def adapted_parameter_names(model: nn.Module, group: str) -> list[str]:
    """encoder: the shared feature extractor (default); encoder+ssl: also the self-supervised head (the
    paper's choice); norm: affine parameters of the encoder's normalization layers only."""
    if group == "encoder":
        return [f"encoder.{n}" for n, _ in model.encoder.named_parameters()]
    if group == "encoder+ssl":
        return [f"encoder.{n}" for n, _ in model.encoder.named_parameters()] + [
            f"ssl_head.{n}" for n, _ in model.ssl_head.named_parameters()
        ]
    if group == "norm":
        return norm_parameter_names(model.encoder, "encoder.")
    raise TTAError(f"unknown --params {group!r}; choose one of: {', '.join(PARAM_GROUPS)}")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
