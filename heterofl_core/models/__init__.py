"""The model families at any width rate, built by name or from a config through the registry
(:mod:`heterofl_core.families`)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

from torch import nn

from .conv import Conv
from .resnet import PreActResNet18
from .transformer import Transformer, mask_tokens

if TYPE_CHECKING:
    from ..config import ExperimentConfig

__all__ = ["Conv", "PreActResNet18", "Transformer", "build_model", "model_builder", "mask_tokens"]


def build_model(name: str, rate: float = 1.0, **options: object) -> nn.Module:
    """The registered family ``name`` at width ``rate``."""
    from ..families import get_family  # the registry imports the model files: import it when called
    return get_family(name).model_class(rate, **options)


def model_builder(cfg: ExperimentConfig, num_classes: int, track_running_stats: bool = False,
                  in_channels: int | None = None) -> Callable[[float], nn.Module]:
    """``rate -> model`` for this experiment: ``num_classes`` is the vocabulary size for text;
    ``in_channels`` defaults to the family's paper dataset (the model class's default)."""
    from ..families import get_family
    options = get_family(cfg.model).options(cfg, num_classes, in_channels, track_running_stats)
    return partial(build_model, cfg.model, global_rate=cfg.global_rate, scale=cfg.scale, **options)
