"""The MNIST CNN (spec section 3): four conv blocks, global average pool, linear head."""

from __future__ import annotations

import torch
from torch import nn

from ..slicing import FULL, LABELS, PREFIX, Axes, default_axes, module_axes
from .layers import init_norms, make_norm, make_scaler, width


class Conv(nn.Module):
    """Conv3x3 -> Scaler -> Norm -> ReLU -> MaxPool(2) four times (no pool after the last),
    then global average pool -> Linear. Channels ``hidden * rate``."""

    def __init__(self, rate: float = 1.0, *, global_rate: float = 1.0, norm: str = "bn", scale: bool = True,
                 track_running_stats: bool = False, in_channels: int = 1, num_classes: int = 10,
                 hidden: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        channels = [width(rate, c) for c in hidden]
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_channels, *channels], channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), make_scaler(scale, rate, global_rate),
                       make_norm(norm, c_out, track_running_stats), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers[:-1])  # 28 -> 14 -> 7 -> 3, no pool after the last block
        self.head = nn.Linear(channels[-1], num_classes)
        init_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))  # (N, C, H, W) -> (N, C) -> logits (N, classes)

    def width_axes(self) -> dict[str, Axes]:
        """Slicing rules: the first conv keeps its input channels; the head keeps all classes."""
        return {**default_axes(self),
                **module_axes(self, self.features[0], weight=(PREFIX, FULL, FULL, FULL)),
                **module_axes(self, self.head, weight=(LABELS, PREFIX), bias=(LABELS,))}
