"""torchvision ResNets (resnet18/34/50/101/152, resnext, wide_resnet) split after layer1, layer2 or layer3.

The family for a classifier trained with torchvision (`tta train --init`): module names follow torchvision's,
so its weights load as they are. `torchvision_name` fixes depth and widths (`depth` and `width` are unused).
`norm="gn"` swaps every BatchNorm for GroupNorm with `groups` groups. For small images (img_size <= 64) the stem
is the usual CIFAR one, as in timm_resnet: a 3x3 stride-1 convolution and no max-pool (total stride 8, not 32).
"""

from __future__ import annotations

from functools import partial

import torchvision.models.resnet as resnets
from torch import nn

from tta_cli.config import ModelConfig
from tta_cli.errors import TTAError
from tta_cli.models.batchnorm import CleanStatsBatchNorm2d
from tta_cli.models.features import FeatureSpec
from tta_cli.models.registry import register
from tta_cli.models.split import SMALL_IMAGE, SPLITS, split_resnet

NAMES = tuple(name for name in resnets.__all__ if name[0].islower())  # resnet18, ..., wide_resnet101_2
STEM = ("conv1", "bn1", "relu", "maxpool")


def norm_layer(config: ModelConfig):
    if config.norm == "gn":
        return partial(nn.GroupNorm, config.groups)
    if config.norm == "bn":
        return CleanStatsBatchNorm2d
    raise TTAError(f"unknown norm {config.norm!r}; choose gn or bn")


def build_torchvision_resnet(config: ModelConfig) -> resnets.ResNet:
    if config.torchvision_name not in NAMES:
        raise TTAError(f"unknown torchvision ResNet {config.torchvision_name!r}; choose one of: {', '.join(NAMES)}")
    if config.norm == "gn" and config.groups < 1:
        raise TTAError(f"GroupNorm needs at least 1 group, got {config.groups}")
    try:
        model = getattr(resnets, config.torchvision_name)(weights=None, norm_layer=norm_layer(config))
    except ValueError as error:  # e.g. channels not divisible by the GroupNorm groups
        raise TTAError(f"torchvision could not build {config.torchvision_name!r} with norm={config.norm}: {error}") from None
    if config.img_size <= SMALL_IMAGE:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


@register("torchvision_resnet")
def build_torchvision_backbone(config: ModelConfig):
    if config.split not in SPLITS:
        raise TTAError(f"unknown split {config.split!r} for torchvision_resnet; choose one of: {', '.join(SPLITS)}")
    main_model = build_torchvision_resnet(config)
    ssl_model = build_torchvision_resnet(config)  # a fresh, independently initialised copy of the layers after the split
    encoder, main_trunk, ssl_trunk = split_resnet(main_model, ssl_model, STEM, config.split)
    stride = 8 if config.img_size <= SMALL_IMAGE else 32
    if config.img_size % stride:
        raise TTAError(f"torchvision_resnet needs img_size to be a multiple of its total stride {stride}, got {config.img_size}")
    spec = FeatureSpec("map", main_model.fc.in_features, config.img_size // stride)
    return encoder, main_trunk, ssl_trunk, spec
