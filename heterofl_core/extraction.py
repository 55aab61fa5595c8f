"""Sub-model extraction: which channels of the global model a client holds in a round.

A client of rate r holds, on every scaled axis of global width K, n = ceil(r K)
channels (per head on a ``Heads`` axis: n / h of each head's K / h); every row of a
FULL or LABELS axis. The strategies differ in which n:

- ``static`` (HeteroFL, Diao et al., ICLR 2021): channels 0..n-1, every round.
  Exactly :meth:`Slicer.holdings <heterofl_core.slicing.Slicer.holdings>`.
- ``rolling`` (FedRolex, Alam et al., NeurIPS 2022; github.com/AIoT-MLSys-Lab/FedRolex,
  ``split_model``): in a round of shift t the window {(j - t) mod K : j < n}, local
  position j holding global channel (j - t) mod K (``torch.roll(arange(K), t)[:n]``), the
  same for every client of the round; per head on a ``Heads`` axis. The shift is
  t = round - 1 (:func:`rolling_shift`, rounds counted from 1): round 1 is static, and
  each round the window moves by one channel (the paper's stride r = 1). Unlike the
  authors' Transformer code, which keeps per-head prefixes for q/k/v, the window also
  rolls inside each head. The paper's Eq. 4 writes the window forwards ({t, .., t+n-1});
  this follows the code.
- ``random`` (Federated Dropout, Caldas et al., 2018, arXiv 1812.07210): a fresh random
  set of n channels per client and round, sorted, drawn from the generator given.

Coupling: axes that must agree (a layer's outputs and the next layer's inputs, residual
sums, q/k/v/o heads) hold the same channels. Static slicing is already sound, and its
index set of an axis depends only on the axis' rule (PREFIX or ``Heads(h)``), its global
width K and its local width n; so axes that must agree share (rule, K) and n. Rolling and
random keep that: each (rule, K) class of axes gets one relabelling of its K channels
(a roll; a random permutation, per head for ``Heads``), and an axis holds the relabelled
static set. Axes of one class that need not agree are coupled too, which is valid.
"""

from __future__ import annotations

import torch

from .config import EXTRACTIONS  # noqa: F401  (static, rolling, random: the config's choices)
from .slicing import PREFIX, Heads, Holding, Rule, Slicer, State, roll_channels


def rolling_shift(round_: int) -> int:
    """FedRolex's shift in round ``round_`` (counted from 1): round - 1, so round 1 is static."""
    if round_ < 1:
        raise ValueError(f"round {round_}: rounds are counted from 1")
    return round_ - 1


def rolling_window(size: int, n: int, round_: int) -> torch.Tensor:
    """FedRolex's window on one PREFIX axis of ``size`` channels for a client holding ``n`` of them,
    in round ``round_`` (from 1): local position j holds global channel (j - (round_ - 1)) mod size."""
    if not 1 <= n <= size:
        raise ValueError(f"a client holds 1 to {size} of the axis' {size} channels; got {n}")
    return roll_channels(torch.arange(size), (PREFIX,), rolling_shift(round_))[:n]


def holdings(slicer: Slicer, rate: float, extraction: str, round_: int = 1,
             generator: torch.Generator | None = None) -> dict[str, Holding]:
    """Per tensor name, the global indices a rate-``rate`` client holds in round ``round_`` (from 1).

    ``random`` draws from ``generator`` (required): one ``randperm`` per (rule, K) class of
    scaled axes, classes by increasing (K, heads) with PREFIX as 0 heads, and per ``Heads`` class
    one per head in head order; whatever the rate. Clients drawn one after another from the
    round's generator get different sets; the same generator state gives the same sets (on
    the generator's device: CPU and CUDA generators draw differently).
    """
    static = slicer.holdings(rate)
    if extraction == "static":
        return static
    # per (rule, K) class, the relabelling of its channels: static channel c becomes relabel[c]
    if extraction == "rolling":
        shift = rolling_shift(round_)
        relabel = {(rule, size): roll_channels(torch.arange(size), (rule,), shift) for rule, size in _classes(slicer)}
    elif extraction == "random":
        if generator is None:
            raise ValueError("random extraction draws from a generator: pass the round's torch.Generator")
        relabel = {(rule, size): _random_order(rule, size, generator) for rule, size in _classes(slicer)}
    else:
        raise ValueError(f"unknown extraction {extraction!r}; valid: {', '.join(EXTRACTIONS)}")
    out = {}
    for key, held in static.items():
        index = []
        for rule, size, channels in zip(slicer.axes[key], slicer.global_shapes[key], held.index):
            if rule == PREFIX or isinstance(rule, Heads):
                channels = relabel[rule, size][channels]
                if extraction == "random":  # per head too: head c's channels lie in [c K/h, (c+1) K/h)
                    channels = channels.sort().values
            index.append(channels)
        if extraction == "rolling":  # the static slice of the rolled tensor: aggregation's fast path
            out[key] = Holding(tuple(index), held.by_label, held.static, shift)
        else:
            out[key] = Holding(tuple(index), held.by_label)
    return out


def split(global_state: State, holdings: dict[str, Holding]) -> State:
    """A client's sub-model state from any holdings: each tensor gathered at its index sets.

    Static holdings give :meth:`Slicer.split <heterofl_core.slicing.Slicer.split>`'s state, by
    its copy of a view (the fast path); other holdings gather axis by axis (``index_select``).
    """
    out = {}
    for key, tensor in global_state.items():
        held = holdings[key]
        if held.static is not None and held.shift == 0:
            out[key] = held.static.take(tensor)
            continue
        for axis, index in enumerate(held.index):
            tensor = tensor.index_select(axis, index.to(tensor.device))
        out[key] = tensor
    return out


def _classes(slicer: Slicer) -> list[tuple[Rule, int]]:
    """The (rule, K) classes of the model's scaled axes, by increasing (K, heads)."""
    classes = {(rule, size) for key, shape in slicer.global_shapes.items()
               for rule, size in zip(slicer.axes[key], shape) if rule == PREFIX or isinstance(rule, Heads)}
    return sorted(classes, key=lambda cls: (cls[1], cls[0].count if isinstance(cls[0], Heads) else 0))


def _random_order(rule: Rule, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of an axis' channels (within each head for ``Heads``), on the CPU."""
    heads = rule.count if isinstance(rule, Heads) else 1
    per_head = size // heads
    return torch.cat([h * per_head + torch.randperm(per_head, generator=generator, device=generator.device).cpu()
                      for h in range(heads)])
