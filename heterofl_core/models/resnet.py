"""Pre-activation ResNet18 for CIFAR10 (spec section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..slicing import FULL, LABELS, PREFIX, Axes, default_axes, module_axes
from .layers import init_norms, make_norm, make_scaler, width


class PreActBlock(nn.Module):
    """o = relu(norm1(scaler(x))); o = conv2(relu(norm2(scaler(conv1(o))))) + shortcut,
    where the shortcut is a 1x1 conv of relu(norm1(...)) when the shape changes, else x."""

    def __init__(self, c_in: int, c_out: int, stride: int, scaler: nn.Module, norm: str, track: bool) -> None:
        super().__init__()
        self.scaler = scaler
        self.norm1 = make_norm(norm, c_in, track)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2 = make_norm(norm, c_out, track)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.scaler(x)))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(self.scaler(out))))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Stem conv, four stages of pre-activation blocks (strides 1, 2, 2, 2), norm-relu head, linear.

    ``blocks=(1, 1, 1, 2)`` gives the paper's 9.6M parameters; the authors' later
    code uses ``(2, 2, 2, 2)`` (11.17M).
    """

    def __init__(self, rate: float = 1.0, *, global_rate: float = 1.0, norm: str = "bn", scale: bool = True,
                 track_running_stats: bool = False, in_channels: int = 3, num_classes: int = 10,
                 hidden: tuple[int, ...] = (64, 128, 256, 512), blocks: tuple[int, ...] = (1, 1, 1, 2)) -> None:
        super().__init__()
        channels = [width(rate, c) for c in hidden]
        scaler = make_scaler(scale, rate, global_rate)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        stages, c_in = [], channels[0]
        for c_out, count, stride in zip(channels, blocks, (1, 2, 2, 2)):
            stage = []
            for i in range(count):
                stage.append(PreActBlock(c_in, c_out, stride if i == 0 else 1, scaler, norm, track_running_stats))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.scaler = scaler
        self.norm = make_norm(norm, c_in, track_running_stats)
        self.head = nn.Linear(c_in, num_classes)
        init_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        out = F.relu(self.norm(self.scaler(out)))
        return self.head(out.mean(dim=(2, 3)))  # (N, C, H, W) -> (N, C) -> logits

    def width_axes(self) -> dict[str, Axes]:
        """Slicing rules: the stem keeps its input channels; the head keeps all classes.
        Shortcut convs need no rule of their own: their input and output are the block's."""
        return {**default_axes(self),
                **module_axes(self, self.stem, weight=(PREFIX, FULL, FULL, FULL)),
                **module_axes(self, self.head, weight=(LABELS, PREFIX), bias=(LABELS,))}
