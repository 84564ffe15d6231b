"""timm ResNets (resnet18/26/34/50, resnext, wide_resnet, ...) split after layer1, layer2 or layer3.

`timm_name` fixes depth and widths (`depth` is unused here; `width` must stay 1: pick a wider timm model,
e.g. wide_resnet50_2). `norm="gn"` swaps every BatchNorm for GroupNorm with `groups` groups. For small
images (img_size <= 64) the stem becomes CIFAR-style: its stride-2 convolution runs at stride 1 (the
single 7x7 becomes a 3x3) and the max-pool is dropped, so the total stride is 8 instead of 32.
"""

from __future__ import annotations

from functools import partial

import timm
from timm.layers import GroupNorm
from torch import nn

from tta_cli.config import ModelConfig
from tta_cli.errors import TTAError
from tta_cli.models.batchnorm import CleanStatsBatchNorm2d
from tta_cli.models.features import FeatureSpec
from tta_cli.models.registry import register
from tta_cli.models.split import SMALL_IMAGE, SPLITS, split_resnet

STEM = ("conv1", "bn1", "act1", "maxpool")
EXAMPLE_NAMES = ("resnet18", "resnet26", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2")


def check_timm_name(name: str) -> None:
    """Only timm's `resnet` module builds the conv1/bn1/act1/maxpool/layer1..4 layout this file splits."""
    if timm.models.get_arch_name(name) not in set(timm.list_models(module="resnet")):
        raise TTAError(f"unknown timm ResNet {name!r}; choose a model from timm's resnet module, e.g. {', '.join(EXAMPLE_NAMES)}")


def norm_kwargs(config: ModelConfig) -> dict:
    """timm's `norm_layer` is called as norm(channels): timm's GroupNorm takes channels first, nn.GroupNorm
    does not (and timm drops a partial's positional arguments), so groups go in by keyword."""
    if config.norm == "gn":
        return {"norm_layer": partial(GroupNorm, num_groups=config.groups)}
    if config.norm == "bn":
        return {"norm_layer": CleanStatsBatchNorm2d}
    raise TTAError(f"unknown norm {config.norm!r}; choose gn or bn")


def use_cifar_stem(model: nn.Module) -> None:
    """Stride-1 stem without max-pool, so a 32x32 image keeps a 4x4 map after layer4."""
    if isinstance(model.conv1, nn.Conv2d):
        model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    else:  # deep stems ("c", "d", "t", ... variants): three 3x3 convs, only the first one strided
        model.conv1[0].stride = (1, 1)
    model.maxpool = nn.Identity()


def build_timm_resnet(config: ModelConfig) -> nn.Module:
    try:
        model = timm.create_model(config.timm_name, pretrained=False, num_classes=0, **norm_kwargs(config))
    except ValueError as error:  # e.g. channels not divisible by the GroupNorm groups
        raise TTAError(f"timm could not build {config.timm_name!r} with norm={config.norm}: {error}") from None
    if config.img_size <= SMALL_IMAGE:
        use_cifar_stem(model)
    return model


@register("timm_resnet")
def build_timm_backbone(config: ModelConfig):
    if config.split not in SPLITS:
        raise TTAError(f"unknown split {config.split!r} for timm_resnet; choose one of: {', '.join(SPLITS)}")
    check_timm_name(config.timm_name)
    if config.width != 1:
        raise TTAError(f"width {config.width} applies to preact_resnet only; for timm_resnet pick a wider timm_name (e.g. wide_resnet50_2)")
    main_model = build_timm_resnet(config)
    ssl_model = build_timm_resnet(config)  # a fresh, independently initialised copy of the layers after the split
    encoder, main_trunk, ssl_trunk = split_resnet(main_model, ssl_model, STEM, config.split)

    stride = main_model.feature_info[-1]["reduction"] // (4 if config.img_size <= SMALL_IMAGE else 1)
    if config.img_size % stride:
        raise TTAError(f"timm_resnet needs img_size to be a multiple of its total stride {stride}, got {config.img_size}")
    spec = FeatureSpec("map", main_model.num_features, config.img_size // stride)
    return encoder, main_trunk, ssl_trunk, spec
