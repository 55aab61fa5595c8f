"""Width slicing: which entries of the global model a rate-r client holds (spec section 5).

Each model family declares once, per parameter, how each axis scales
(:meth:`width_axes` on the model), using the rules below. Everything else here
is generic: the local shape of a tensor comes from building the family at the
client's rate (on the ``meta`` device, so it costs nothing), and a rule says
which global indices those local entries are.

Rules, one per axis:

- ``FULL``: never scaled (input channels, kernel taps, positions, vocabulary).
- ``PREFIX``: the first n indices (hidden channels, embedding dims).
- ``Heads(h)``: the axis is h heads of equal size; keep the first n/h of each head
  (attention q, k, v outputs and linear_o inputs).
- ``LABELS``: all rows are sent to the client, but in aggregation a client adds and
  counts only the rows of the labels it holds (output layers, token embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, Union

import torch
from torch import nn

FULL = "full"
PREFIX = "prefix"
LABELS = "labels"


@dataclass(frozen=True)
class Heads:
    """Per-head prefix over an axis made of ``count`` equal heads."""

    count: int


Rule = Union[str, Heads]
Axes = tuple[Rule, ...]
State = dict[str, torch.Tensor]


def default_axes(model: nn.Module) -> dict[str, Axes]:
    """Rules by layer type: every hidden axis scales; embedding rows do not.

    Families override the exceptions (first layer's input, output layer's rows,
    attention heads) with :func:`module_axes`.
    """
    axes: dict[str, Axes] = {}
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(module, nn.Embedding):
                axes[key] = (FULL, PREFIX)
            else:  # conv (out, in, kh, kw), linear (out, in), norms and biases (channels,)
                axes[key] = (PREFIX, PREFIX, FULL, FULL)[: param.dim()] if param.dim() > 1 else (PREFIX,)
    return axes


def module_axes(model: nn.Module, module: nn.Module, **rules: Axes) -> dict[str, Axes]:
    """``{'<path>.weight': rules['weight'], ...}`` for one submodule of ``model``."""
    path = next(name for name, m in model.named_modules() if m is module)
    return {f"{path}.{name}" if path else name: axes for name, axes in rules.items()}


@dataclass(frozen=True)
class TensorSlice:
    """Where one client tensor sits inside its global tensor."""

    rules: Axes
    local_shape: torch.Size

    @cached_property
    def box(self) -> tuple[int, ...]:
        """The client tensor's shape with heads split out: it holds ``[:n]`` of every axis of
        :meth:`layout` (all of a FULL or LABELS axis)."""
        shape: list[int] = []
        for rule, n in zip(self.rules, self.local_shape):
            shape.extend((rule.count, n // rule.count) if isinstance(rule, Heads) else (n,))
        return tuple(shape)

    def layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """View of a global tensor with every ``Heads`` axis split as (heads, per head)."""
        offset = 0  # how many axes Heads rules have added so far
        for axis, rule in enumerate(self.rules):
            if isinstance(rule, Heads):
                tensor = tensor.unflatten(axis + offset, (rule.count, -1))
                offset += 1
        return tensor

    def region(self, global_tensor: torch.Tensor) -> torch.Tensor:
        """View of ``global_tensor`` holding this client's entries, shaped like :meth:`local_view`."""
        view = self.layout(global_tensor)
        for axis, n in enumerate(self.box):
            if n < view.shape[axis]:
                view = view.narrow(axis, 0, n)
        return view

    def local_view(self, local: torch.Tensor) -> torch.Tensor:
        """The client tensor reshaped like :meth:`region` (heads split out)."""
        return local.view(self.box)


class Slicer:
    """Split and locate sub-models of one model family whose global model has ``global_rate``.

    ``build(rate)`` must return the family's model at that width; the global
    model's ``width_axes()`` gives the rules.
    """

    def __init__(self, build: Callable[[float], nn.Module], global_rate: float = 1.0) -> None:
        self.build = build
        self.global_rate = global_rate
        self._slices = lru_cache(maxsize=None)(self._local_slices)
        with torch.device("meta"):
            model = build(global_rate)
        self.axes: dict[str, Axes] = model.width_axes()
        missing = set(model.state_dict()) - set(self.axes)
        assert not missing, f"width_axes() of {type(model).__name__} misses {sorted(missing)}"

    def _local_slices(self, rate: float) -> dict[str, TensorSlice]:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in self.build(rate).state_dict().items()}
        return {k: TensorSlice(self.axes[k], shape) for k, shape in shapes.items()}

    def slices(self, rate: float) -> dict[str, TensorSlice]:
        """Per tensor name, where a rate-``rate`` client's tensor sits in the global one."""
        return dict(self._slices(rate))

    def split(self, global_state: State, rate: float) -> State:
        """The rate-``rate`` sub-model's state: loads with ``strict=True`` into ``build(rate)``."""
        out = {}
        for key, piece in self.slices(rate).items():
            region = piece.region(global_state[key]).clone(memory_format=torch.contiguous_format)
            out[key] = region.view(piece.local_shape)
        return out
