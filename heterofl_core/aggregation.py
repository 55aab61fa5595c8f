"""Server aggregation: the per-entry count rule of HeteroFL (spec section 5).

Every entry of the new global model is the plain mean over the clients whose
sub-model holds it; an entry no client held this round keeps its old value.
In a ``LABELS`` axis (output rows, token-embedding rows) a client adds and
counts only the rows of the labels it holds.

Per tensor the work is close to the memory floor (``heterofl bench`` measures it):

- one accumulator, which becomes the output: each client tensor is added in place
  into its region (no per-client full-size temporaries); in a ``LABELS`` axis only
  the client's label rows are gathered and added (a WikiText2 client holds a small
  share of the 33,279 token rows);
- one count tensor from per-axis coverage (an einsum over clients of small 0/1
  vectors, broadcast over the axes no client slices);
- one in-place division, and a ``where`` that restores untouched entries only when
  some entry can be untouched (no client holds the whole tensor, or labels decide).

Client sums run in client order, so the result is the same bit for bit as adding
each client's masked tensor into a zero accumulator.
"""

from __future__ import annotations

import string
from typing import Sequence

import torch

from .slicing import FULL, LABELS, PREFIX, Slicer, State, TensorSlice


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
    slices = [slicer.slices(rate) for rate in rates]
    new_state = {}
    for key, old in global_state.items():
        locals_ = [state[key] for state in client_states]
        if not old.is_floating_point():  # counters and the like: averaged plainly
            new_state[key] = torch.stack(locals_).double().mean(0).round().to(old.dtype)
            continue
        pieces = [client_slices[key] for client_slices in slices]
        labelled = pieces[0].rules[0] == LABELS
        rows = [labels.to(old.device) for labels in label_sets] if labelled else []
        total = torch.zeros_like(old)
        for i, (piece, local) in enumerate(zip(pieces, locals_)):
            region, values = piece.region(total), piece.local_view(local)
            if labelled:  # only the rows of the client's labels: gather, add, write back (a repeated
                # label writes the same sum twice, so it adds once)
                region.index_copy_(0, rows[i], region.index_select(0, rows[i]).add_(values.index_select(0, rows[i])))
            else:
                region.add_(values)
        masks = [_row_mask(held, old) for held in rows] if labelled else [None] * len(pieces)
        if labelled and _divide_by_bands(total, old, pieces, masks):
            new_state[key] = total
            continue
        count = _count(pieces, masks, old)
        if not labelled and any(piece.local_shape == old.shape for piece in pieces):
            new_state[key] = total.div_(count)  # some client holds every entry: nothing to restore
        else:
            new_state[key] = torch.where(count > 0, total.div_(count.clamp_(min=1)), old, out=total)
    return new_state


def _divide_by_bands(total: torch.Tensor, old: torch.Tensor, pieces: list[TensorSlice],
                     masks: list[torch.Tensor]) -> bool:
    """``total / count`` where some client holds an entry, ``old`` elsewhere, in place, for a
    tensor of label rows whose only other scaled axis (if any) is a prefix (output layers, token
    embeddings); False, untouched, for any other layout.

    Along the prefix the clients' widths cut the columns into bands; within a band every
    column has the same count per row: the number of clients at least that wide holding
    the row. So the count is one (rows,) vector per band, never a full-size tensor.
    """
    scaled = [axis for axis in range(1, old.dim()) if any(piece.rules[axis] != FULL for piece in pieces)]
    if len(scaled) > 1 or any(piece.rules[axis] != PREFIX for piece in pieces for axis in scaled):
        return False
    axis = scaled[0] if scaled else None
    width = [piece.local_shape[axis] if axis is not None else 1 for piece in pieces]
    edges = sorted(set(width), reverse=True) + [0]  # band j: columns [edges[j + 1], edges[j])
    rows = [old.shape[0]] + [1] * (old.dim() - 1)
    for j in range(len(edges) - 1):
        holders = sum(mask for mask, w in zip(masks, width) if w >= edges[j])  # (rows,)
        band = slice(edges[j + 1], edges[j])
        part, before = (total, old) if axis is None else (_narrow(total, axis, band), _narrow(old, axis, band))
        part.div_(holders.clamp(min=1).view(rows))  # rows nobody holds are 0 / 1: restored next
        unheld = (holders == 0).nonzero().squeeze(1)  # row ids, not a full-size where (which is not vectorised)
        part.index_copy_(0, unheld, before.index_select(0, unheld))
    if axis is not None and edges[0] < old.shape[axis]:  # columns beyond the widest client keep their values
        _narrow(total, axis, slice(edges[0], old.shape[axis])).copy_(_narrow(old, axis, slice(edges[0], old.shape[axis])))
    return True


def _narrow(tensor: torch.Tensor, axis: int, band: slice) -> torch.Tensor:
    return tensor.narrow(axis, band.start, band.stop - band.start)


def _row_mask(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """0/1 float vector over axis 0: the client's label rows (each once)."""
    return torch.zeros(like.shape[0], dtype=like.dtype, device=like.device).index_fill_(0, rows, 1)


def _count(pieces: list[TensorSlice], masks: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """How many clients hold each entry: sum over clients of the product of per-axis coverage.

    Only scaled axes enter the einsum; the result broadcasts over the others.
    """
    operands, letters, shape = [], [], []
    for axis, size in enumerate(like.shape):
        if all(piece.rules[axis] == FULL for piece in pieces):
            shape.append(1)
            continue
        rows = [mask if (axis == 0 and mask is not None) else piece.coverage(axis, size, like.device)
                for piece, mask in zip(pieces, masks)]
        operands.append(torch.stack(rows).to(like.dtype))  # (clients, size)
        letters.append(string.ascii_lowercase[axis])
        shape.append(size)
    if not operands:
        return torch.full([1] * like.dim(), float(len(pieces)), dtype=like.dtype, device=like.device)
    spec = ",".join(f"z{letter}" for letter in letters) + "->" + "".join(letters)
    return torch.einsum(spec, *operands).reshape(shape)
