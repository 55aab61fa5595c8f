"""Building blocks shared by the three model families: width, Scaler, norms."""

from __future__ import annotations

import math

import torch
from torch import nn


def width(rate: float, base: int) -> int:
    """Channels of a rate-``rate`` model for a layer of ``base`` channels at rate 1: ceil(rate * base)."""
    return max(1, math.ceil(rate * base - 1e-9))


class Scaler(nn.Module):
    """Divide by (client rate / global rate) in training, identity in eval (spec section 4).

    A sub-model of rate r sees roughly r times fewer inputs per unit, so its
    activations are smaller; the Scaler makes them match the global model's.
    """

    def __init__(self, scaler_rate: float) -> None:
        super().__init__()
        self.scaler_rate = scaler_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scaler_rate if self.training else x

    def extra_repr(self) -> str:
        return f"scaler_rate={self.scaler_rate:g}"


def make_scaler(scale: bool, rate: float, global_rate: float) -> nn.Module:
    """A Scaler when ``scale`` is on, else identity."""
    return Scaler(rate / global_rate) if scale else nn.Identity()


def make_norm(norm: str, channels: int, track_running_stats: bool) -> nn.Module:
    """Normalisation layer by name (spec section 2).

    ``bn`` is static batch norm: batch statistics only while training
    (``track_running_stats=False``); the server's evaluation copy tracks a
    cumulative average (``momentum=None``) over the training set.
    """
    if norm == "bn":
        return nn.BatchNorm2d(channels, momentum=None, track_running_stats=track_running_stats)
    if norm == "in":
        return nn.GroupNorm(channels, channels)
    if norm == "ln":
        return nn.GroupNorm(1, channels)
    if norm == "gn":
        return nn.GroupNorm(4, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; valid: bn, in, ln, gn, none")


def init_norms(model: nn.Module) -> None:
    """Affine norm weights 1, biases 0; linear biases 0 (the authors' init, by type)."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
