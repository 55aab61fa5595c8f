"""Server aggregation: the per-entry count rule of HeteroFL (spec section 5).

The rule. Every entry of the new global model is the plain mean over the clients
whose sub-model holds it; an entry no client held this round keeps its old value.
In a ``LABELS`` axis (output rows, token-embedding rows) a client adds and
counts only the rows of the labels it holds. Entries that are not floats
(counters) are averaged plainly.

:func:`aggregate_plain` is that rule written as its definition, for any index
sets (:class:`~heterofl_core.slicing.Holding`: per axis, the global index of each
of a client tensor's positions): per tensor, a zero sum and a zero count; each
client adds its values into its entries and 1 into their counts; then sum / count
where the count is positive, the old value elsewhere.

The fast path. When every client holds a static slice (prefixes, per-head
prefixes: the paper's sub-models), :func:`aggregate_fast` computes the same
result, close to the memory floor (``heterofl bench`` measures both), and no
count tensor is ever built:

- one accumulator per tensor, which becomes the output: the first client's values
  are copied into their region and every other client's are added in place;
- the clients' regions are nested boxes (a wider client holds everything a narrower
  one holds), so the count is one number on each shell between consecutive boxes:
  the shells are divided in place;
- in a ``LABELS`` axis a client's label rows are gathered and added (no other row
  of it is read), and each band of columns is divided by a vector over rows: the
  holders of each row among the clients that wide;
- entries no client holds get their old values back.

It makes one public PyTorch call per tensor and client. One private
``torch._foreach_*`` call per client instead saved about 1 us per tensor on a CPU:
about 1 ms of 30 on ResNet18 (a1-e1), nothing measurable on the Transformer.

Client sums run in client order and every sum is divided by its count, so the
result is the same bit for bit as the plain rule's, for a finite old state
(tested on every family and level mixture).

Rolling windows (FedRolex, :mod:`heterofl_core.extraction`). All clients of a round
share one shift, so their windows nest once every scaled axis of the global tensors is
rolled by it (:func:`~heterofl_core.slicing.roll_channels`: the windows become the static
prefixes): the fast path rolls, aggregates as above, and rolls back. A roll only moves
entries, so this too is the plain rule's result bit for bit.

Random channel sets (Federated Dropout) do not nest: they take the plain rule, which is
already a scatter-add (``index_put_`` with ``accumulate``).

Which to call: :func:`aggregate` for clients of given rates (the fast path);
:func:`aggregate_holdings` for clients of any index sets, whatever the extraction (the
fast path when every holding is a static slice in one frame, i.e. unrolled or rolled by
one shift, and they nest; the plain rule otherwise).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Mapping, Sequence

import torch

from .slicing import FULL, LABELS, PREFIX, Axes, Holding, Slicer, State, TensorSlice, roll_channels

Box = tuple[int, ...]
Holdings = Mapping[str, Holding]  # one client's: tensor name -> the global entries it holds


# ----------------------------------------------------------------------------- the rule

def aggregate_plain(global_state: State, client_states: Sequence[State], holdings: Sequence[Holdings],
                    label_sets: Sequence[torch.Tensor]) -> State:
    """The count rule as its definition: each entry becomes the mean over the clients holding it.

    ``holdings[m][key]`` says which global entries client m's tensor ``key`` holds (any index
    sets); on a ``by_label`` tensor client m adds and counts only the rows in ``label_sets[m]``.
    Entries no client holds keep their old values; inputs are left untouched.
    """
    _check_lengths(client_states, holdings, label_sets)
    new_state: State = {}
    for key, old in global_state.items():
        if not old.is_floating_point():  # counters and the like: averaged plainly
            new_state[key] = _plain_mean(old, [state[key] for state in client_states])
            continue
        total, count = torch.zeros_like(old), torch.zeros_like(old)
        for state, holding, labels in zip(client_states, (held[key] for held in holdings), label_sets):
            local, index = state[key], [i.to(old.device) for i in holding.index]
            if tuple(local.shape) != holding.shape:
                raise ValueError(f"{key}: a client tensor of shape {tuple(local.shape)} holds {holding.shape}")
            if holding.by_label:  # only its labels' rows: its other rows are not even read
                rows = torch.unique(labels.to(old.device))
                local, index[0] = local[rows], index[0][rows]
            entries = _open_grid(index)  # the entries it holds, shaped like ``local``
            total.index_put_(entries, local.to(old.dtype), accumulate=True)
            count.index_put_(entries, torch.ones((), dtype=old.dtype, device=old.device), accumulate=True)
        new_state[key] = torch.where(count > 0, total / count, old)
    return new_state


def _open_grid(index: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``np.ix_`` in torch: axis k's indices shaped (1, .., n_k, .., 1), broadcasting to the grid."""
    return tuple(i.view([-1 if axis == k else 1 for axis in range(len(index))]) for k, i in enumerate(index))


def _plain_mean(old: torch.Tensor, values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rounded mean of non-float entries, in their dtype (the old value when there are none)."""
    if not values:
        return old.clone()
    return torch.stack(list(values)).double().mean(0).round().to(old.dtype)


def _check_lengths(client_states: Sequence[State], per_client: Sequence[object],
                   label_sets: Sequence[torch.Tensor]) -> None:
    if not (len(client_states) == len(per_client) == len(label_sets)):
        raise ValueError(f"got {len(client_states)} client states, {len(per_client)} rates or holdings, "
                         f"{len(label_sets)} label sets")


# ----------------------------------------------------------------------------- the entries

def aggregate(slicer: Slicer, global_state: State, client_states: Sequence[State], rates: Sequence[float],
              label_sets: Sequence[torch.Tensor]) -> State:
    """New global state from the clients' trained sub-model states; inputs are left untouched.

    ``rates[m]`` is client m's width rate and ``label_sets[m]`` the class (token) ids it holds.
    Tensors stay on their device and keep their dtype. :func:`aggregate_plain`'s result, by
    :func:`aggregate_fast`.
    """
    _check_lengths(client_states, rates, label_sets)
    holdings = {rate: slicer.holdings(rate) for rate in set(rates)}  # static slices: they nest
    return aggregate_fast(global_state, client_states, [holdings[rate] for rate in rates], label_sets)


def aggregate_holdings(global_state: State, client_states: Sequence[State], holdings: Sequence[Holdings],
                       label_sets: Sequence[torch.Tensor]) -> State:
    """The count rule for clients holding any index sets (static, rolling or random extraction):
    :func:`aggregate_fast` when it applies (every holding a static slice, all rolled by one shift,
    the slices nested), else :func:`aggregate_plain`."""
    _check_lengths(client_states, holdings, label_sets)
    if fast_path_applies(global_state, holdings):
        return aggregate_fast(global_state, client_states, holdings, label_sets)
    return aggregate_plain(global_state, client_states, holdings, label_sets)


def fast_path_applies(global_state: State, holdings: Sequence[Holdings]) -> bool:
    """Whether :func:`aggregate_holdings` takes the fast path for these holdings."""
    return _why_not_fast(global_state, holdings) is None


# ----------------------------------------------------------------------------- the fast path

def aggregate_fast(global_state: State, client_states: Sequence[State], holdings: Sequence[Holdings],
                   label_sets: Sequence[torch.Tensor]) -> State:
    """:func:`aggregate_plain`'s result, bit for bit, for clients holding static slices (of one
    :class:`~heterofl_core.slicing.Slicer`) that nest, when the old state is finite (an inf or nan
    old value in a label row that some client holds becomes nan here, the clients' mean there).
    The slices may be rolled, all by one shift (FedRolex's windows of one round): then the old
    state is rolled so that they are prefixes, aggregated, and the result rolled back.

    Raises ``ValueError`` for other holdings (:func:`aggregate_holdings` picks the plain rule for them).
    """
    _check_lengths(client_states, holdings, label_sets)
    shift = _shared_shift(global_state, holdings)
    if not shift:
        return _aggregate_static(global_state, client_states, holdings, label_sets)
    floats = [key for key, old in global_state.items() if old.is_floating_point()]
    if any(held[key].static is None for held in holdings for key in floats):
        raise ValueError("a rolled holding is not a static slice (aggregate_holdings takes any index sets)")
    rules = {key: holdings[0][key].static.rules for key in floats}
    rolled = {key: roll_channels(old, rules[key], shift) if key in rules else old for key, old in global_state.items()}
    new_state = _aggregate_static(rolled, client_states, holdings, label_sets)
    return {key: roll_channels(new, rules[key], -shift) if key in rules else new for key, new in new_state.items()}


def _shifts(global_state: State, holdings: Sequence[Holdings]) -> set[int]:
    """The shifts by which the clients' holdings of float tensors are rolled."""
    return {held[key].shift for held in holdings for key, old in global_state.items() if old.is_floating_point()}


def _shared_shift(global_state: State, holdings: Sequence[Holdings]) -> int:
    """The one shift by which every client's static slices are rolled (0 without clients)."""
    shifts = _shifts(global_state, holdings)
    if len(shifts) > 1:
        raise ValueError(f"clients' windows are rolled by different shifts {sorted(shifts)} "
                         f"(aggregate_holdings takes any index sets)")
    return shifts.pop() if shifts else 0


def _aggregate_static(global_state: State, client_states: Sequence[State], holdings: Sequence[Holdings],
                      label_sets: Sequence[torch.Tensor]) -> State:
    """:func:`aggregate_fast` in the frame where every client's slice is a static one (shift ignored)."""
    if not client_states:
        return {key: value.clone() for key, value in global_state.items()}
    new_state: State = {}
    pieces: dict[str, list[TensorSlice]] = {}  # of the tensors whose clients hold boxes
    rows: dict[torch.device, list[torch.Tensor]] = {}  # distinct label rows (unique waits for a GPU: once)
    for key, old in global_state.items():
        locals_ = [state[key] for state in client_states]
        if not old.is_floating_point():  # counters and the like: averaged plainly
            new_state[key] = _plain_mean(old, locals_)
            continue
        static = [held[key].static for held in holdings]
        if any(piece is None for piece in static):
            raise ValueError(f"{key}: a holding is not a static slice (aggregate_holdings takes any index sets)")
        if static[0].rules[0] == LABELS:
            if old.device not in rows:
                rows[old.device] = [torch.unique(labels.to(old.device)) for labels in label_sets]
            new_state[key] = _mean_over_label_rows(old, static, locals_, rows[old.device])
        else:
            pieces[key] = static
    new_state.update(_mean_over_boxes({key: global_state[key] for key in pieces}, pieces,
                                      [{key: state[key] for key in pieces} for state in client_states]))
    return {key: new_state[key] for key in global_state}


def _why_not_fast(global_state: State, holdings: Sequence[Holdings]) -> str | None:
    """Why :func:`aggregate_fast` does not apply to these holdings; ``None`` when it does."""
    holdings = list({id(held): held for held in holdings}.values())  # clients of one rate share theirs
    if len(_shifts(global_state, holdings)) > 1:
        return "the clients' windows are rolled by different shifts"
    for key, old in global_state.items():
        if not old.is_floating_point() or not holdings:
            continue
        pieces = [held[key].static for held in holdings]
        if any(piece is None for piece in pieces):
            return f"{key}: a holding is not a static slice"
        if len({piece.rules for piece in pieces}) > 1:
            return f"{key}: the clients' slices follow different rules"
        reason = _label_rows_unsupported(pieces[0].rules) if pieces[0].rules[0] == LABELS else \
            _not_nested(sorted({piece.box for piece in pieces}, reverse=True))
        if reason:
            return f"{key}: {reason}"
    return None


def _not_nested(boxes: list[Box]) -> str | None:
    """Why these boxes, widest first, do not nest; ``None`` when each holds the next."""
    for outer, inner in zip(boxes, boxes[1:]):
        if any(i > o for o, i in zip(outer, inner)):
            return f"client regions {outer} and {inner} do not nest"
    return None


def _label_rows_unsupported(rules: Axes) -> str | None:
    """Why the fast path cannot take a tensor of label rows with these rules; ``None`` when it can."""
    scaled = [rule for rule in rules[1:] if rule != FULL]
    if len(scaled) > 1 or any(rule != PREFIX for rule in scaled):
        return f"label rows with scaled axes {scaled} (the fast path takes at most one more PREFIX axis)"
    return None


def _mean_over_boxes(old: State, pieces: dict[str, list[TensorSlice]], client_states: list[State]) -> State:
    """Entry-wise mean over the clients holding each entry, for tensors whose clients hold nested boxes."""
    total = {key: torch.empty_like(value) for key, value in old.items()}
    layouts = {key: pieces[key][0].layout(tensor) for key, tensor in total.items()}  # heads split out
    for key, view in layouts.items():  # the sums start from 0 outside the first client's box ...
        for shell in _shell(tuple(view.shape), pieces[key][0].box):
            _part(view, shell).zero_()
    regions: dict[tuple[str, Box], torch.Tensor] = {}  # the same view for every client that wide
    for m, state in enumerate(client_states):
        for key, local in state.items():
            piece = pieces[key][m]
            if (key, piece.box) not in regions:
                regions[key, piece.box] = piece.region(total[key])
            if m == 0:  # ... and from its values inside (0 + x = x)
                regions[key, piece.box].copy_(piece.local_view(local))
            else:
                regions[key, piece.box].add_(piece.local_view(local))
    for key, view in layouts.items():
        before = pieces[key][0].layout(old[key])
        clients_per_box = Counter(piece.box for piece in pieces[key])
        boxes = sorted(clients_per_box, reverse=True)  # widest first
        if _not_nested(boxes):
            raise ValueError(f"{key}: {_not_nested(boxes)} (aggregate_holdings takes any index sets)")
        holders = 0
        for outer, inner in zip(boxes, boxes[1:] + [None]):
            holders += clients_per_box[outer]  # the clients holding ``outer``: it and every wider box
            if holders > 1:
                for shell in _shell(outer, inner):
                    _part(view, shell).div_(float(holders))
        for shell in _shell(tuple(view.shape), boxes[0]):  # entries beyond the widest client keep their values
            _part(view, shell).copy_(_part(before, shell))
    return total


def _mean_over_label_rows(old: torch.Tensor, pieces: list[TensorSlice], locals_: list[torch.Tensor],
                          rows: list[torch.Tensor]) -> torch.Tensor:
    """The same for a tensor whose axis 0 is label rows and whose only other scaled axis, if
    any, is a prefix (output layers, token embeddings): a client adds and counts only the rows
    of its labels (``rows[m]``, distinct), and no other row of it is read.

    Along the prefix the clients' widths cut the columns into bands; within a band each row
    has one count: the number of clients at least that wide holding it.
    """
    if _label_rows_unsupported(pieces[0].rules):
        raise ValueError(_label_rows_unsupported(pieces[0].rules))
    scaled = [axis for axis in range(1, old.dim()) if pieces[0].rules[axis] != FULL]  # at most one PREFIX
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
        # rows some client that wide holds start from 0, the others from their old value (x 1); a
        # multiply, 3x faster here than torch.where, so an inf or nan old value in a held row gives nan
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
