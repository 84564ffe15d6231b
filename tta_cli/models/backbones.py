"""Imports every backbone family so its `@register` runs; adding a family adds one line here."""

from tta_cli.models import (
    preact_resnet,  # noqa: F401
    timm_resnet,  # noqa: F401
    torchvision_resnet,  # noqa: F401
    vit,  # noqa: F401
)
