"""The model families' networks at any width rate; the registry (:mod:`heterofl_core.families`)
builds them by name or from a config (``build_model``, ``model_builder``)."""

from .conv import Conv
from .resnet import PreActResNet18
from .transformer import Transformer, mask_tokens

__all__ = ["Conv", "PreActResNet18", "Transformer", "mask_tokens"]
