"""Small, obviously-correct references for slicing, aggregation (spec section 5) and the models (section 3).

Deliberately independent of ``heterofl_core.slicing``: the per-axis rules are
written out here by parameter name from the spec, index lists are built by
hand per axis, and sub-tensors are gathered / scattered with advanced indexing
over an index grid (the ``t[np.ix_(...)]`` idiom). The model references are the
spec's formulas in functional form over a state dict. Slow and plain on purpose.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heterofl_core.families import build_model
from heterofl_core.slicing import Slicer

LEVELS = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
RATES = tuple(LEVELS.values())
FAMILIES = ("conv", "resnet18", "transformer")
SMALL_VOCAB = 50
NUM_HEADS = 8

# Reference rules, one per axis: "prefix", "full", "labels" or ("heads", count).
PREFIX, FULL, LABELS = "prefix", "full", "labels"
HEADS = ("heads", NUM_HEADS)
Rules = tuple


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These tests run thousands of small tensor ops, where intra-op threads cost more than they
    save (and far more on a busy shared machine). Restored after each module that imports this."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# Narrower variants of each family for the many-example tests: same structure and rules,
# every level still an exact fraction of every scaled axis (8 heads of 16 at rate 1).
TINY: dict[str, dict] = {
    "conv": {"hidden": (16, 32, 64, 128)},
    "resnet18": {"hidden": (16, 32, 64, 128)},
    "transformer": {"embed": 128, "hidden": 128, "layers": 2},
}


def family_options(family: str, **extra: object) -> dict:
    """Constructor options used by the tests: a small vocabulary for the transformer."""
    options: dict = {"vocab_size": SMALL_VOCAB} if family == "transformer" else {}
    options.update(extra)
    return options


def builder(family: str, **options: object) -> Callable[[float], nn.Module]:
    """``rate -> model`` with fixed options (what :class:`Slicer` takes)."""
    return partial(build_model, family, **family_options(family, **options))


_slicers: dict = {}


def slicer_for(family: str, global_rate: float = 1.0, **options: object) -> Slicer:
    """A cached :class:`Slicer` for the family with these options and global rate."""
    key = (family, global_rate, tuple(sorted(options.items())))
    if key not in _slicers:
        _slicers[key] = Slicer(builder(family, global_rate=global_rate, **options), global_rate=global_rate)
    return _slicers[key]


def num_classes(family: str, vocab_size: int = SMALL_VOCAB) -> int:
    return vocab_size if family == "transformer" else 10


def reference_rules(family: str, key: str, ndim: int) -> Rules:
    """The spec's slicing rule of one parameter, written out by name (spec section 5)."""
    parts = key.split(".")
    if family == "conv":
        if key == "features.0.weight":
            return (PREFIX, FULL, FULL, FULL)  # the first layer keeps its input channels
        if parts[0] == "head":
            return (LABELS, PREFIX) if parts[-1] == "weight" else (LABELS,)
    elif family == "resnet18":
        if key == "stem.weight":
            return (PREFIX, FULL, FULL, FULL)
        if parts[0] == "head":
            return (LABELS, PREFIX) if parts[-1] == "weight" else (LABELS,)
    elif family == "transformer":
        if key == "token_embedding.weight":
            return (LABELS, PREFIX)
        if key == "position_embedding.weight":
            return (FULL, PREFIX)
        if parts[0] == "output":
            return (LABELS, PREFIX) if parts[-1] == "weight" else (LABELS,)
        if len(parts) == 5 and parts[2] == "attention":
            proj, kind = parts[3], parts[4]
            if proj in ("q", "k", "v"):
                return (HEADS, PREFIX) if kind == "weight" else (HEADS,)
            if proj == "o" and kind == "weight":
                return (PREFIX, HEADS)
    else:
        raise ValueError(family)
    # Everything else: every hidden axis is a prefix, kernel taps are full.
    return {1: (PREFIX,), 2: (PREFIX, PREFIX), 4: (PREFIX, PREFIX, FULL, FULL)}[ndim]


def reference_local_size(rule, global_size: int, scale: float) -> int:
    """Size of one axis in the client model: ``scale`` = client rate / global rate."""
    if rule in (FULL, LABELS):
        return global_size
    local = global_size * scale
    assert local == int(local), (rule, global_size, scale)
    return int(local)


def axis_indices(rule, global_size: int, local_size: int) -> torch.Tensor:
    """Global indices of one axis that a client holds, in the client's order."""
    if rule in (FULL, LABELS):
        assert local_size == global_size
        return torch.arange(global_size)
    if rule == PREFIX:
        return torch.arange(local_size)
    _, heads = rule
    per_head_global, per_head_local = global_size // heads, local_size // heads
    return torch.cat([h * per_head_global + torch.arange(per_head_local) for h in range(heads)])


def grid(indices: Sequence[torch.Tensor], device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """``np.ix_`` in torch: an open grid for advanced indexing."""
    indices = [i.to(device) if device is not None else i for i in indices]
    return torch.meshgrid(*indices, indexing="ij") if len(indices) > 1 else (indices[0],)


def reference_split(family: str, global_state: dict, scale: float) -> dict:
    """Sub-model state of a client of rate ``scale * global rate``, gathered entry by entry."""
    out = {}
    for key, tensor in global_state.items():
        rules = reference_rules(family, key, tensor.dim())
        index = [axis_indices(rule, size, reference_local_size(rule, size, scale))
                 for rule, size in zip(rules, tensor.shape)]
        out[key] = tensor[grid(index, tensor.device)].clone()
    return out


def reference_aggregate(family: str, global_state: dict, client_states: Sequence[dict],
                        label_sets: Sequence[torch.Tensor]) -> dict:
    """Plain per-client, per-tensor loop: accumulate sums and counts, divide where count > 0."""
    new = {}
    for key, old in global_state.items():
        if not old.is_floating_point():
            new[key] = torch.stack([c[key] for c in client_states]).double().mean(0).round().to(old.dtype)
            continue
        rules = reference_rules(family, key, old.dim())
        total = torch.zeros_like(old)
        count = torch.zeros_like(old)
        for state, labels in zip(client_states, label_sets):
            local = state[key]
            global_index = [axis_indices(rule, g, n) for rule, g, n in zip(rules, old.shape, local.shape)]
            local_index = [torch.arange(n) for n in local.shape]
            if rules[0] == LABELS:  # only the rows of this client's labels
                rows = torch.unique(labels.cpu())
                global_index[0], local_index[0] = rows, rows
            total[grid(global_index, old.device)] += local[grid(local_index, local.device)].to(old.dtype)
            count[grid(global_index, old.device)] += 1
        new[key] = torch.where(count > 0, total / count.clamp(min=1), old)
    return new


def coverage_mask(family: str, key: str, global_shape: torch.Size, scale: float,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask over a global tensor: the entries one client of relative rate ``scale`` adds."""
    rules = reference_rules(family, key, len(global_shape))
    index = [axis_indices(rule, g, reference_local_size(rule, g, scale)) for rule, g in zip(rules, global_shape)]
    if rules[0] == LABELS and labels is not None:
        index[0] = torch.unique(labels)
    mask = torch.zeros(global_shape, dtype=torch.bool)
    mask[grid(index)] = True
    return mask


def random_state_like(shapes: dict, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> dict:
    """A state of random normal tensors with the given shapes."""
    return {k: torch.randn(shape, generator=generator, dtype=dtype) for k, shape in shapes.items()}


def shapes_at(family: str, rate: float, **options: object) -> dict[str, torch.Size]:
    """State shapes of the family built at ``rate`` (on the meta device: free)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in builder(family, **options)(rate).state_dict().items()}


def random_labels(count: int, generator: torch.Generator) -> torch.Tensor:
    """A random subset (possibly empty) of ``range(count)`` as a long tensor."""
    size = int(torch.randint(0, count + 1, (1,), generator=generator))
    return torch.randperm(count, generator=generator)[:size]


# ---------------------------------------------------------------- reference forward passes (spec section 3)

def _bn(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    """Static BN while training: batch statistics only; identity for norm 'none' (no parameters)."""
    if f"{prefix}.weight" not in state:
        return x
    return F.batch_norm(x, None, None, state[f"{prefix}.weight"], state[f"{prefix}.bias"], training=True)


def reference_conv_forward(state: dict, x: torch.Tensor, s: float) -> torch.Tensor:
    """Conv3x3 -> /s -> BN -> ReLU -> MaxPool(2) x4 (no pool after the last) -> mean -> linear."""
    for block in range(4):
        i = 5 * block  # conv, scaler, norm, relu, pool
        x = F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1) / s
        x = F.relu(_bn(x, state, f"features.{i + 2}"))
        if block < 3:
            x = F.max_pool2d(x, 2)
    return F.linear(x.mean(dim=(2, 3)), state["head.weight"], state["head.bias"])


def reference_resnet_forward(state: dict, x: torch.Tensor, s: float, blocks=(1, 1, 1, 2)) -> torch.Tensor:
    """Pre-activation ResNet18 as written in the spec."""
    out = F.conv2d(x, state["stem.weight"], padding=1)
    for stage, (count, first_stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
        for b in range(count):
            p, stride = f"stages.{stage}.{b}", first_stride if b == 0 else 1
            o = F.relu(_bn(out / s, state, f"{p}.norm1"))
            shortcut = F.conv2d(o, state[f"{p}.shortcut.weight"], stride=stride) if f"{p}.shortcut.weight" in state else out
            o = F.conv2d(o, state[f"{p}.conv1.weight"], stride=stride, padding=1)
            o = F.conv2d(F.relu(_bn(o / s, state, f"{p}.norm2")), state[f"{p}.conv2.weight"], padding=1)
            out = o + shortcut
    out = F.relu(_bn(out / s, state, "norm"))
    return F.linear(out.mean(dim=(2, 3)), state["head.weight"], state["head.bias"])


def reference_transformer_forward(state: dict, tokens: torch.Tensor, s: float, heads: int = NUM_HEADS) -> torch.Tensor:
    """Post-norm encoder as written in the spec, without dropout."""
    def lin(x, p):
        return F.linear(x, state[f"{p}.weight"], state[f"{p}.bias"])

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], state[f"{p}.weight"], state[f"{p}.bias"])

    n, length = tokens.shape
    x = state["token_embedding.weight"][tokens] / s + state["position_embedding.weight"][:length] / s
    x = ln(x, "embed_norm")
    e = x.shape[-1]
    d = e // heads
    layer = 0
    while f"layers.{layer}.norm1.weight" in state:
        p = f"layers.{layer}"
        q, k, v = (lin(x, f"{p}.attention.{name}").div(s).view(n, length, heads, d).transpose(1, 2) for name in "qkv")
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (N, h, S, S)
        attended = (weights @ v).transpose(1, 2).reshape(n, length, e)
        x = ln(x + lin(attended, f"{p}.attention.o") / s, f"{p}.norm1")
        ff = lin(F.gelu(lin(x, f"{p}.linear1") / s), f"{p}.linear2") / s
        x = ln(x + ff, f"{p}.norm2")
        layer += 1
    return lin(ln(F.gelu(lin(x, "decoder_linear") / s), "decoder_norm"), "output")


# ----------------------------------------------------------------------------- aggregation references

SMALL = {"conv": {"hidden": (4, 8, 8, 16)}, "resnet18": {"hidden": (4, 4, 8, 8)},
         "transformer": {"vocab_size": 12, "embed": 16, "heads": 2, "hidden": 16, "layers": 1, "bptt": 8}}
SMALL_LEVELS = {"conv": "abcde", "resnet18": "abcde", "transformer": "abcd"}  # 2 heads: d keeps 1 per head


def assert_states_equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def per_entry_mean(old: dict, client_states, holdings, label_sets) -> dict:
    """Obviously correct, slow: every client entry is added to the global entry it sits on and
    counted there (label rows only for the client's labels); counted entries become sum / count."""
    new = {}
    for key, before in old.items():
        sums, counts = {}, {}
        for state, held, labels in zip(client_states, holdings, label_sets):
            for position in itertools.product(*map(range, state[key].shape)):
                if held[key].by_label and position[0] not in labels.tolist():
                    continue
                entry = tuple(int(held[key].index[axis][j]) for axis, j in enumerate(position))
                sums[entry] = sums.get(entry, 0.0) + float(state[key][position])
                counts[entry] = counts.get(entry, 0) + 1
        new[key] = before.clone()
        for entry, total in sums.items():
            new[key][entry] = total / counts[entry]
    return new
