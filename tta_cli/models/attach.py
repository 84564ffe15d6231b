"""Attaching TTT to a classifier the user already has: its weights become a TTTModel's encoder and main head.

A plain classifier names its layers as the family's network does (torchvision and timm: conv1, bn1, layer1..4, fc;
timm's ViT: patch_embed, cls_token, pos_embed, blocks.N, norm, head; preact_resnet: stem, layer1..3, final, fc).
The TTTModel holds the same layers under encoder.*, main_head.0.* (the trunk) and main_head.1.1.* (the output
layer). The self-supervised head is not in the classifier and keeps its fresh initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tta_cli.config import ModelConfig
from tta_cli.errors import TTAError
from tta_cli.models.ttt_model import TTTModel

OUTPUT_LAYER = {"vit": "head"}  # the classifier's final linear layer, where it is not called `fc`
CLASSIFIER_PARTS = ("encoder.", "main_head.")
OPTIONAL = ("num_batches_tracked",)  # BatchNorm counters some saved weights leave out
WRAPPER_PREFIX = "module."  # DataParallel / DistributedDataParallel


def plain_key(model_key: str, backbone: str) -> str | None:
    """A TTTModel state key -> the plain classifier's key; None outside the encoder and main head."""
    if model_key.startswith("encoder."):
        key = model_key.removeprefix("encoder.")
        return key.removeprefix("embed.")  # vit: the token embedding's parts sit at the top of timm's ViT
    if model_key.startswith("main_head.1.1."):
        return f"{OUTPUT_LAYER.get(backbone, 'fc')}.{model_key.removeprefix('main_head.1.1.')}"
    if model_key.startswith("main_head.0."):
        return model_key.removeprefix("main_head.0.")
    return None


def describe(config: ModelConfig) -> str:
    """The architecture a classifier must have, in the config's own words."""
    name = {"timm_resnet": f"timm_name={config.timm_name}", "torchvision_resnet": f"torchvision_name={config.torchvision_name}",
            "vit": f"embed_dim={config.embed_dim}, vit_depth={config.vit_depth}"}.get(
        config.backbone, f"depth={config.depth}, width={config.width}")
    return f"model.backbone={config.backbone} ({name}, norm={config.norm}, img_size={config.img_size})"


def classifier_keys(state: Mapping[str, torch.Tensor], model: TTTModel, backbone: str) -> dict[str, str]:
    """TTTModel key -> the key in `state` holding its weights: TTTModel keys as they are (a TTTModel's own state
    dict, ssl head ignored), plain classifier keys otherwise."""
    own = [key for key in model.state_dict() if key.startswith(CLASSIFIER_PARTS)]
    if any(key.startswith("main_head.") for key in state):
        return {key: key for key in own}
    return {key: plain_key(key, backbone) for key in own}


def unwrapped(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Weights saved from a DataParallel / DistributedDataParallel wrapper, without its `module.` prefix."""
    if state and all(key.startswith(WRAPPER_PREFIX) for key in state):
        return {key.removeprefix(WRAPPER_PREFIX): value for key, value in state.items()}
    return state


def classifier_classes(state: Mapping[str, torch.Tensor], backbone: str) -> int | None:
    """The number of classes the classifier in `state` outputs (None when its output layer is not there)."""
    state = unwrapped(state)
    output = "main_head.1.1.weight"
    weight = state.get(output if any(key.startswith("main_head.") for key in state) else plain_key(output, backbone))
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def classifier_state(state: Mapping[str, torch.Tensor], model: TTTModel, config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """`state` (a classifier's weights) keyed and shaped as `model`'s encoder and main head; the one-line error
    says what does not fit."""
    state = unwrapped(state)
    keys = classifier_keys(state, model, config.backbone)
    expected = model.state_dict()
    missing = [theirs for ours, theirs in keys.items() if theirs not in state and not ours.endswith(OPTIONAL)]
    ignored = set(keys.values()) | {"mean", "std"}  # a TTTModel's own state dict also holds these and its ssl head
    unexpected = [key for key in state if key not in ignored and not key.startswith("ssl_head.")]
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        count = len(missing) + len(unexpected) - 1
        more = f" and {count} more" if count else ""
        raise TTAError(f"{where} does not hold a {describe(config)} classifier ({detail}{more}); set model.backbone and its "
                       "architecture keys to the classifier's")
    for ours, theirs in keys.items():
        if theirs in state and tuple(state[theirs].shape) != tuple(expected[ours].shape):
            raise TTAError(shape_error(where, theirs, tuple(state[theirs].shape), tuple(expected[ours].shape), ours, config))
    return {ours: state[theirs] for ours, theirs in keys.items() if theirs in state}


def shape_error(where: str, key: str, found: tuple, wanted: tuple, model_key: str, config: ModelConfig) -> str:
    hint = ""
    if model_key.startswith("encoder.conv1"):
        hint = "; for img_size <= 64 the stem is a 3x3 stride-1 convolution without max-pool (the usual CIFAR ResNet), above it the ImageNet one"
    return f"{where}: {key} has shape {found}, a {describe(config)} classifier has {wanted}{hint}"


def load_classifier(model: TTTModel, state: Mapping[str, torch.Tensor], config: ModelConfig, where: str) -> None:
    """Copy a classifier's weights into `model`'s encoder and main head (checked as `classifier_state` does)."""
    weights = classifier_state(state, model, config, where)
    missing = model.load_state_dict(weights, strict=False).missing_keys
    assert all(not key.startswith(CLASSIFIER_PARTS) or key.endswith(OPTIONAL) for key in missing), missing
