"""Server aggregation: the per-entry count rule of HeteroFL (spec section 5).

Every entry of the new global model is the plain mean over the clients whose
sub-model holds it; an entry no client held this round keeps its old value.
In a ``LABELS`` axis (output rows, token-embedding rows) a client adds and
counts only the rows of the labels it holds.

The work is close to the memory floor (``heterofl bench`` measures it), and no
count tensor is ever built:

- one accumulator per tensor, which becomes the output: the first client's values
  are copied into their region and every other client's are added in place, all
  tensors of a client in one ``torch._foreach_*`` call (a model has tens of small
  tensors, where per-call overhead would cost more than the arithmetic);
- the clients' regions are nested boxes (a wider client holds everything a narrower
  one holds), so the count is one number on each shell between consecutive boxes:
  the shells are divided in place, one call per count;
- in a ``LABELS`` axis a client's label rows are gathered and added (no other row
  of it is read), and each band of columns is divided by a vector over rows: the
  holders of each row among the clients that wide;
- entries no client holds get their old values back.

Client sums run in client order and every sum is divided by its count, so the
result is the same bit for bit as adding each client's masked tensor into a zero
accumulator and dividing by a count tensor.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, Sequence

import torch

from .slicing import FULL, LABELS, PREFIX, Slicer, State, TensorSlice

Box = tuple[int, ...]


def aggregate(slicer: Slicer, global_state: State, client_states: Sequence[State], rates: Sequence[float],
              label_sets: Sequence[torch.Tensor]) -> State:
    """New global state from the clients' trained sub-model states; inputs are left untouched.

    ``rates[m]`` is client m's width rate and ``label_sets[m]`` the class (token) ids it holds.
    Tensors stay on their device and keep their dtype.
    """
    if not (len(client_states) == len(rates) == len(label_sets)):
        raise ValueError(f"got {len(client_states)} client states, {len(rates)} rates, {len(label_sets)} label sets")
    if not client_states:
        return {key: value.clone() for key, value in global_state.items()}
    slices = {rate: slicer.slices(rate) for rate in set(rates)}
    new_state: State = {}
    boxed = []
    rows: dict[torch.device, list[torch.Tensor]] = {}  # distinct label rows (unique waits for a GPU: once)
    for key, old in global_state.items():
        locals_ = [state[key] for state in client_states]
        if not old.is_floating_point():  # counters and the like: averaged plainly
            new_state[key] = torch.stack(locals_).double().mean(0).round().to(old.dtype)
        elif slices[rates[0]][key].rules[0] == LABELS:
            if old.device not in rows:
                rows[old.device] = [torch.unique(labels.to(old.device)) for labels in label_sets]
            new_state[key] = _mean_over_label_rows(old, [slices[rate][key] for rate in rates], locals_,
                                                   rows[old.device])
        else:
            boxed.append(key)
    new_state.update(_mean_over_boxes({key: global_state[key] for key in boxed},
                                      {key: [slices[rate][key] for rate in rates] for key in boxed},
                                      [{key: state[key] for key in boxed} for state in client_states]))
    return {key: new_state[key] for key in global_state}


def _mean_over_boxes(old: State, pieces: dict[str, list[TensorSlice]], client_states: list[State]) -> State:
    """Entry-wise mean over the clients holding each entry, for tensors whose clients hold boxes.

    Every tensor at once with ``torch._foreach_*`` (one call per client, one for the division):
    the model has tens of small tensors, and per-tensor calls would cost more than the arithmetic.
    """
    total = {key: torch.empty_like(value) for key, value in old.items()}
    layouts = {key: pieces[key][0].layout(tensor) for key, tensor in total.items()}  # heads split out
    regions: dict[tuple[str, Box], torch.Tensor] = {}  # the same view for every client that wide
    for m, state in enumerate(client_states):
        views, values = [], []
        for key, local in state.items():
            piece = pieces[key][m]
            if (key, piece.box) not in regions:
                regions[key, piece.box] = piece.region(total[key])
            views.append(regions[key, piece.box])
            values.append(piece.local_view(local))
        if not views:
            continue
        if m == 0:  # the first client's values start the sums (0 + x = x); zeros elsewhere
            torch._foreach_copy_(views, values)
            rest = [_part(view, shell) for key, view in layouts.items()
                    for shell in _shell(tuple(view.shape), pieces[key][0].box)]
            if rest:
                torch._foreach_zero_(rest)
        else:
            torch._foreach_add_(views, values)
    parts: dict[int, list[torch.Tensor]] = {}  # by count: one call per count, not per shell
    for key, view in layouts.items():
        before = pieces[key][0].layout(old[key])
        clients_per_box = Counter(piece.box for piece in pieces[key])
        boxes = _nested_boxes(clients_per_box)
        holders = 0
        for outer, inner in zip(boxes, boxes[1:] + [None]):
            holders += clients_per_box[outer]  # the clients holding ``outer``: it and every wider box
            parts.setdefault(holders, []).extend(_part(view, shell) for shell in _shell(outer, inner))
        for shell in _shell(tuple(view.shape), boxes[0]):  # entries beyond the widest client keep their values
            _part(view, shell).copy_(_part(before, shell))
    for holders, shells in parts.items():
        if holders > 1:
            torch._foreach_div_(shells, float(holders))
    return total


def _mean_over_label_rows(old: torch.Tensor, pieces: list[TensorSlice], locals_: list[torch.Tensor],
                          rows: list[torch.Tensor]) -> torch.Tensor:
    """The same for a tensor whose axis 0 is label rows and whose only other scaled axis, if
    any, is a prefix (output layers, token embeddings): a client adds and counts only the rows
    of its labels (``rows[m]``, distinct), and no other row of it is read.

    Along the prefix the clients' widths cut the columns into bands; within a band each row
    has one count: the number of clients at least that wide holding it.
    """
    scaled = [axis for axis in range(1, old.dim()) if any(piece.rules[axis] != FULL for piece in pieces)]
    if len(scaled) > 1 or any(piece.rules[axis] != PREFIX for piece in pieces for axis in scaled):
        raise ValueError(f"label rows with scaled axes {[pieces[0].rules[a] for a in scaled]}: "
                         f"only one more PREFIX axis is supported")
    masks = [old.new_zeros(old.shape[0]).index_fill_(0, held, 1) for held in rows]
    axis = scaled[0] if scaled else None
    width = [piece.local_shape[axis] if axis is not None else 1 for piece in pieces]
    edges = sorted(set(width), reverse=True) + [0]  # band j: columns [edges[j + 1], edges[j])
    column_shape = [-1] + [1] * (old.dim() - 1)
    total, bands = torch.empty_like(old), []
    for j in range(len(edges) - 1):
        holders = sum(mask for mask, w in zip(masks, width) if w >= edges[j])  # (rows,)
        if axis is None:
            part, before = total, old
        else:
            part, before = (t.narrow(axis, edges[j + 1], edges[j] - edges[j + 1]) for t in (total, old))
        # rows some client that wide holds start from 0, the others from their old value (x 1)
        torch.mul(before, (holders == 0).to(old.dtype).view(column_shape), out=part)
        bands.append((part, holders))
    if axis is not None and edges[0] < old.shape[axis]:  # columns beyond the widest client keep their values
        rest = old.shape[axis] - edges[0]
        total.narrow(axis, edges[0], rest).copy_(old.narrow(axis, edges[0], rest))
    for piece, local, held in zip(pieces, locals_, rows):
        region, values = piece.region(total), local.index_select(0, held)
        if region.is_contiguous():
            region.index_add_(0, held, values)
        else:  # index_add_ is slow on strided views: gather, add, scatter
            region.index_copy_(0, held, region.index_select(0, held).add_(values))
    for part, holders in bands:
        part.div_(holders.clamp(min=1).view(column_shape))  # sum / holders; rows nobody holds: old / 1
    return total


def _nested_boxes(boxes: Iterable[Box]) -> list[Box]:
    """The clients' distinct boxes, widest first; each must hold the next."""
    boxes = sorted(set(boxes), reverse=True)
    for outer, inner in zip(boxes, boxes[1:]):
        if any(i > o for o, i in zip(outer, inner)):
            raise ValueError(f"client regions {outer} and {inner} do not nest: the count rule needs "
                             f"every client to hold a prefix box of the global tensor")
    return boxes


def _shell(outer: Box, inner: Box | None) -> Iterator[tuple[tuple[int, int], ...]]:
    """Disjoint boxes (per axis: start, stop) covering ``outer`` minus ``inner``: the k-th
    starts where ``inner`` stops along axis k, inside ``inner`` before k, ``outer`` after."""
    if inner is None:
        yield tuple((0, n) for n in outer)
        return
    for k, (o, i) in enumerate(zip(outer, inner)):
        if i < o:
            yield tuple((0, n) for n in inner[:k]) + ((i, o),) + tuple((0, n) for n in outer[k + 1:])


def _part(tensor: torch.Tensor, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
    for axis, (start, stop) in enumerate(box):
        if stop - start < tensor.shape[axis]:
            tensor = tensor.narrow(axis, start, stop - start)
    return tensor
