"""Models: the TTTModel and the backbone families behind one factory."""

from tta_cli.models.features import FeatureSpec
from tta_cli.models.registry import BACKBONES, build_model, register
from tta_cli.models.ttt_model import TTTModel

__all__ = ["BACKBONES", "FeatureSpec", "TTTModel", "build_model", "register"]
