"""Server aggregation: the per-entry count rule of HeteroFL (spec section 5).

Every entry of the new global model is the plain mean over the clients whose
sub-model holds it; an entry no client held this round keeps its old value.
In a ``LABELS`` axis (output rows, token-embedding rows) a client adds and
counts only the rows of the labels it holds.

Per tensor the work is: one in-place add of each client tensor into its region
of an accumulator (no per-client full-size temporaries), one count tensor from
per-axis coverage (an einsum over clients of small 0/1 vectors), one division.
"""

from __future__ import annotations

import string
from typing import Sequence

import torch

from .slicing import FULL, LABELS, Slicer, State, TensorSlice


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
        masks = [_row_mask(piece, labels, old) for piece, labels in zip(pieces, label_sets)]
        total = torch.zeros_like(old)
        for piece, local, mask in zip(pieces, locals_, masks):
            region = piece.region(total)
            if mask is None:
                region.add_(piece.local_view(local))
            else:  # only the rows of the client's labels (where, not a product: 0 * inf would leak)
                rows = mask.view(-1, *[1] * (local.dim() - 1)) > 0
                region.add_(torch.where(rows, piece.local_view(local), 0))
        count = _count(pieces, masks, old)
        new_state[key] = torch.where(count > 0, total / count.clamp(min=1), old)
    return new_state


def _row_mask(piece: TensorSlice, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """0/1 float vector over axis 0 for a LABELS axis, else None."""
    if piece.rules[0] != LABELS:
        return None
    mask = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    mask[labels.to(like.device)] = 1
    return mask


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
