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

A :class:`TensorSlice` says where a client tensor sits as a box (the fast form:
views and narrowing); a :class:`Holding` says the same as index sets, one per axis
(the general form: any set of channels per axis, which is what aggregation's
plain rule takes). Other sub-model extractions (rolling windows, random channel
sets) build holdings in :mod:`heterofl_core.extraction`; :func:`roll_channels`
turns a rolling window into the static prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, Sequence, Union

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


def roll_channels(tensor: torch.Tensor, rules: Axes, shift: int) -> torch.Tensor:
    """``tensor`` with every scaled axis rolled by ``shift`` as ``torch.roll`` does (entry i moves to
    (i + shift) mod size; within each head on a ``Heads`` axis); FULL and LABELS axes stay.

    Rolled so, FedRolex's window in a round of that shift becomes the static prefix
    (:mod:`heterofl_core.extraction`); ``-shift`` rolls back.
    """
    for axis, rule in enumerate(rules):
        if isinstance(rule, Heads):  # (.., E, ..) -> (.., heads, E / heads, ..), roll within each head
            tensor = tensor.unflatten(axis, (rule.count, -1)).roll(shift, axis + 1).flatten(axis, axis + 1)
        elif rule == PREFIX:
            tensor = tensor.roll(shift, axis)
    return tensor


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

    def take(self, global_tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of this client's entries of ``global_tensor``, shaped like the client tensor."""
        return self.region(global_tensor).clone(memory_format=torch.contiguous_format).view(self.local_shape)

    def local_view(self, local: torch.Tensor) -> torch.Tensor:
        """The client tensor reshaped like :meth:`region` (heads split out)."""
        return local.view(self.box)

    def indices(self, global_shape: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Per axis of the global tensor, the global index of each local position along it:
        ``arange(n)`` for a prefix, ``h * size + arange(n / heads)`` for head h of ``Heads``,
        every index of a FULL or LABELS axis."""
        out = []
        for rule, n, size in zip(self.rules, self.local_shape, global_shape):
            if isinstance(rule, Heads):  # (heads, n / heads) -> (n,)
                head_start = torch.arange(rule.count)[:, None] * (size // rule.count)
                out.append((head_start + torch.arange(n // rule.count)).flatten())
            else:
                assert rule == PREFIX or n == size, f"a {rule} axis is never scaled: {n} of {size}"
                out.append(torch.arange(n))
        return tuple(out)


@dataclass(frozen=True, eq=False)
class Holding:
    """Which entries of a global tensor one client tensor holds, as index sets.

    ``index[k][j]`` is the global index, along axis k, of the client tensor's position j
    (any distinct indices, in any order: prefixes, per-head prefixes, or arbitrary channel
    sets). With ``by_label``, axis 0 is label rows: in aggregation the client adds and counts
    only the rows of the labels it holds. ``static`` is the :class:`TensorSlice` this holding
    equals once the global tensor is rolled by ``shift`` (:func:`roll_channels`): shift 0 for
    the static slices of :meth:`Slicer.holdings`, the round's shift for FedRolex's rolling
    windows; it lets aggregation take its fast path. ``None`` for any other index sets.
    """

    index: tuple[torch.Tensor, ...]
    by_label: bool = False
    static: TensorSlice | None = None
    shift: int = 0

    @classmethod
    def of(cls, piece: TensorSlice, global_shape: Sequence[int]) -> Holding:
        """The holding of a static slice (prefixes, per-head prefixes) of a tensor of ``global_shape``."""
        return cls(piece.indices(global_shape), piece.rules[:1] == (LABELS,), piece)

    @property
    def shape(self) -> tuple[int, ...]:
        """The client tensor's shape."""
        return tuple(len(i) for i in self.index)


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
        for key, tensor in model.state_dict().items():  # refuse a plan the slicer cannot honour
            rules, where = self.axes[key], f"width_axes() of {type(model).__name__}: {key} {tuple(tensor.shape)}"
            if len(rules) != tensor.dim():
                raise ValueError(f"{where} has {tensor.dim()} axes but {len(rules)} rules {rules}")
            for axis, (rule, size) in enumerate(zip(rules, tensor.shape)):
                if rule == LABELS and axis != 0:
                    raise ValueError(f"{where}: LABELS on axis {axis}; label rows are supported on axis 0 only")
                if isinstance(rule, Heads) and (rule.count < 1 or size % rule.count):
                    raise ValueError(f"{where}: axis {axis} of size {size} is not {rule.count} equal heads")
                if not isinstance(rule, Heads) and rule not in (FULL, PREFIX, LABELS):
                    raise ValueError(f"{where}: unknown rule {rule!r} on axis {axis}; valid: "
                                     f"FULL, PREFIX, LABELS, Heads(n)")

    def _local_slices(self, rate: float) -> dict[str, TensorSlice]:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in self.build(rate).state_dict().items()}
        return {k: TensorSlice(self.axes[k], shape) for k, shape in shapes.items()}

    def slices(self, rate: float) -> dict[str, TensorSlice]:
        """Per tensor name, where a rate-``rate`` client's tensor sits in the global one."""
        return dict(self._slices(rate))

    @cached_property
    def global_shapes(self) -> dict[str, torch.Size]:
        """Per tensor name, the global model's shape."""
        return {key: piece.local_shape for key, piece in self._slices(self.global_rate).items()}

    @cached_property
    def _holdings(self) -> Callable[[float], dict[str, Holding]]:
        return lru_cache(maxsize=None)(
            lambda rate: {key: Holding.of(piece, self.global_shapes[key]) for key, piece in self._slices(rate).items()})

    def holdings(self, rate: float) -> dict[str, Holding]:
        """Per tensor name, the global indices a rate-``rate`` client's tensor holds (index sets)."""
        return dict(self._holdings(rate))

    def split(self, global_state: State, rate: float) -> State:
        """The rate-``rate`` sub-model's state: loads with ``strict=True`` into ``build(rate)``."""
        return {key: piece.take(global_state[key]) for key, piece in self.slices(rate).items()}
