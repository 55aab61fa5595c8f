"""The three model families at any width rate, and a registry that builds them from a config."""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from ..config import ExperimentConfig
from .conv import Conv
from .resnet import PreActResNet18
from .transformer import Transformer, mask_tokens

MODEL_FAMILIES: dict[str, type[nn.Module]] = {"conv": Conv, "resnet18": PreActResNet18, "transformer": Transformer}

__all__ = ["Conv", "PreActResNet18", "Transformer", "MODEL_FAMILIES", "build_model", "model_builder", "mask_tokens"]


def build_model(name: str, rate: float = 1.0, **options: object) -> nn.Module:
    """The family ``name`` (conv, resnet18, transformer) at width ``rate``."""
    if name not in MODEL_FAMILIES:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[name](rate, **options)


def model_builder(cfg: ExperimentConfig, num_classes: int, track_running_stats: bool = False,
                  in_channels: int | None = None) -> Callable[[float], nn.Module]:
    """``rate -> model`` for this experiment: ``num_classes`` is the vocabulary size for text;
    ``in_channels`` defaults to the family's dataset (1 for conv, 3 for resnet18)."""
    common = dict(global_rate=cfg.global_rate, scale=cfg.scale)
    if cfg.model == "transformer":
        options = dict(vocab_size=num_classes, embed=cfg.embedding_size, heads=cfg.num_heads,
                       hidden=cfg.hidden_size, layers=cfg.num_layers, dropout=cfg.dropout, bptt=cfg.bptt)
    else:
        options = dict(norm=cfg.norm, track_running_stats=track_running_stats, num_classes=num_classes,
                       in_channels=in_channels or (1 if cfg.model == "conv" else 3))
        if cfg.model == "resnet18":
            options["blocks"] = cfg.resnet_blocks
    return partial(build_model, cfg.model, **common, **options)
