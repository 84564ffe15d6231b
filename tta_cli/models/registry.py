"""Backbone registry: each family registers a builder; `build_model(cfg, task)` builds any of them.

A builder returns (encoder, main_trunk, ssl_trunk, FeatureSpec): the encoder is the shared part up
to the split; the trunks are two independently initialised copies of the layers after it. The
factory adds the classifier to the main trunk and the task's output layer to the ssl trunk.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tta_cli.config import ModelConfig
from tta_cli.errors import TTAError
from tta_cli.models.features import FeatureSpec, LinearClassifier
from tta_cli.models.ttt_model import TTTModel

Builder = Callable[[ModelConfig], tuple[nn.Module, nn.Module, nn.Module, FeatureSpec]]
BACKBONES: dict[str, Builder] = {}

# Normalization used until a training set's statistics are known (the checkpoint stores the real ones).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.25, 0.25, 0.25)


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        BACKBONES[name] = builder
        return builder

    return add


def build_model(config: ModelConfig, task, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> TTTModel:
    """Build the Y-shaped model for `config` with `task`'s self-supervised output layer."""
    import tta_cli.models.backbones  # noqa: F401  (registers every family)

    if config.backbone not in BACKBONES:
        raise TTAError(f"unknown backbone {config.backbone!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    encoder, main_trunk, ssl_trunk, spec = BACKBONES[config.backbone](config)
    main_head = nn.Sequential(main_trunk, LinearClassifier(spec, config.num_classes))
    ssl_head = nn.Sequential(ssl_trunk, task.build_output(spec, config.img_size))
    return TTTModel(encoder, main_head, ssl_head, mean, std)
