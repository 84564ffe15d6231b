"""A timm VisionTransformer sized for small images (vit-tiny-ish: patch 4 on 32x32 gives 64 patches + cls).

Split `blockN` puts the patch + position embedding and the first N transformer blocks in the shared
encoder (N = 1..vit_depth); each trunk holds the remaining blocks and the final LayerNorm. `block9` of
12 is the ViT recipes' default. `norm` and `groups` do not apply (ViTs use LayerNorm).
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tta_cli.config import ModelConfig
from tta_cli.errors import TTAError
from tta_cli.models.features import FeatureSpec
from tta_cli.models.registry import register


class TokenEmbedding(nn.Module):
    """Images (B, 3, H, W) -> tokens (B, 1 + L, D): patch embedding, class token prepended, positions added."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token  # (1, 1, D)
        self.pos_embed = vit.pos_embed  # (1, 1 + L, D), class token included
        self.norm_pre = vit.norm_pre

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images)  # (B, L, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.norm_pre(torch.cat([cls, patches], dim=1) + self.pos_embed)


def parse_split(split: str, depth: int) -> int:
    """Split "blockN" -> N, the number of transformer blocks inside the shared encoder."""
    match = re.fullmatch(r"block(\d+)", split)
    if match is None or not 1 <= int(match.group(1)) <= depth:
        raise TTAError(f"unknown split {split!r} for vit; choose blockN with N in 1..{depth} (e.g. block{max(1, depth * 3 // 4)})")
    return int(match.group(1))


def build_vit(config: ModelConfig) -> VisionTransformer:
    if config.img_size % config.patch_size:
        raise TTAError(f"vit img_size {config.img_size} is not a multiple of patch_size {config.patch_size}")
    if config.embed_dim % config.vit_heads:
        raise TTAError(f"vit embed_dim {config.embed_dim} is not divisible by vit_heads {config.vit_heads}")
    vit = VisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.vit_depth,
        num_heads=config.vit_heads,
        num_classes=0,
        class_token=True,
        global_pool="token",
    )
    # Explicit softmax attention instead of F.scaled_dot_product_attention: under torch.func.vmap the fused
    # kernels (and their backward) have no batching rule and fall back to a slow per-sample loop.
    for block in vit.blocks:
        block.attn.fused_attn = False
    return vit


def numbered_blocks(vit: VisionTransformer, start: int, stop: int) -> nn.Sequential:
    """Blocks start..stop-1, keeping timm's indices as names (`blocks.9` stays block 9 in any part)."""
    return nn.Sequential(OrderedDict((str(index), vit.blocks[index]) for index in range(start, stop)))


@register("vit")
def build_vit_backbone(config: ModelConfig):
    if config.vit_depth < 1:
        raise TTAError(f"vit_depth must be at least 1, got {config.vit_depth}")
    cut = parse_split(config.split, config.vit_depth)
    main_vit = build_vit(config)
    ssl_vit = build_vit(config)  # a fresh, independently initialised copy of the layers after the split
    encoder = nn.Sequential(OrderedDict(embed=TokenEmbedding(main_vit), blocks=numbered_blocks(main_vit, 0, cut)))
    main_trunk = nn.Sequential(OrderedDict(blocks=numbered_blocks(main_vit, cut, config.vit_depth), norm=main_vit.norm))
    ssl_trunk = nn.Sequential(OrderedDict(blocks=numbered_blocks(ssl_vit, cut, config.vit_depth), norm=ssl_vit.norm))
    spec = FeatureSpec("tokens", config.embed_dim, config.img_size // config.patch_size, has_cls=True)
    return encoder, main_trunk, ssl_trunk, spec
