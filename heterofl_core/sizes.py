"""Model sizes: parameters, FLOPs for one sample and MB, per level and per mixture (spec section 8).

Two FLOP counts are reported, and they answer different questions:

- **authors' FLOPs** (:func:`count_flops_authors`) reproduce the counter behind the
  paper's tables: forward hooks on every leaf module, one sample, train mode, a
  per-module cost rule, and the cost counted once *per parameter tensor* of the
  module (a layer with weight and bias counts twice). This is a bookkeeping
  convention, not an operation count; it is what makes "330.2M" come out.
- **standard FLOPs** (:func:`count_flops_standard`) are ``torch.utils.flop_counter``'s
  count of the same forward pass (a multiply-add = 2 FLOPs, matmuls and convs
  only). Shown beside the authors' number and always labelled "standard".

A mixture (``a-b-c-d-e``, ``a2-b8``) is the proportion-weighted mean of its levels;
its "ratio" is that mean parameter count over the global (first) level's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .config import LEVEL_RATES, parse_model_mode
from .models import build_model

COUNTED_PARAMETERS = ("weight", "bias")  # the authors count only these parameter names
DEFAULT_VOCAB_SIZE = 33278  # WikiText2 training vocabulary, without the mask token
SEQUENCE_LENGTH = 64  # one bptt window: the transformer's sample


@dataclass(frozen=True)
class ModelSize:
    """One row of a size table: a level (``"a"``) or a mixture (``"a-b-c-d-e"``, ``"a2-b8"``)."""

    model_mode: str
    params: int  # entries of every weight and bias (mixture: proportion-weighted mean, rounded)
    flops: int  # authors' convention, one sample (mixture: proportion-weighted mean, rounded)
    mb: float  # params * 4 / 2**20 (mixture: weighted mean of the levels' MB)
    ratio: float  # params / global model's params (the global model = first level of the mode)
    flops_standard: int  # torch FlopCounterMode, one sample, forward only; NOT the paper's convention


# ----------------------------------------------------------------------------- counters

def count_params(model: nn.Module) -> int:
    """Entries of every ``weight`` and ``bias`` parameter (the authors' convention)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in COUNTED_PARAMETERS)


def _module_cost(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """Cost of one call of ``module`` under the authors' rules (spec section 8); 0 where there is no rule."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        positions = out.shape[0] * out.shape[2] * out.shape[3]  # N * H_out * W_out
        cost = kh * kw * module.in_channels * (module.out_channels // module.groups) * positions
        return cost + (module.out_channels * positions if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        rows = x.numel() // module.in_features  # (..., in_features): every leading index is a row
        return rows * module.in_features * module.out_features  # no bias term
    if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)):
        return x.numel() * (2 if module.affine else 1)
    if isinstance(module, nn.LayerNorm):
        return x.numel() * (2 if module.elementwise_affine else 1)
    return 0  # Embedding, GroupNorm, and anything else without a rule


def count_flops_authors(model: nn.Module, sample: torch.Tensor) -> int:
    """The authors' FLOPs for one forward of ``sample`` in train mode (spec section 8).

    Every leaf module that owns parameters adds (its cost) x (its number of
    weight/bias tensors) each time it is called; parameter-free modules add nothing.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        tensors = sum(1 for name, _ in module.named_parameters(recurse=False) if name in COUNTED_PARAMETERS)
        total += _module_cost(module, inputs[0], output) * tensors

    leaves = [m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.train()
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total


def count_flops_standard(model: nn.Module, sample: torch.Tensor) -> int:
    """torch's FlopCounterMode total for one train-mode forward of ``sample`` (a multiply-add = 2).

    Attention runs on the math backend while counting: the fused CPU kernel has no
    flop formula and would silently count as 0; the math path is counted as its two bmm.
    """
    was_training = model.training
    try:
        model.train()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(sample)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- levels and mixtures

def _sample(model_name: str, vocab_size: int) -> torch.Tensor:
    """One input: an MNIST image, a CIFAR10 image, or one 64-token sequence of ids."""
    if model_name == "conv":
        return torch.zeros(1, 1, 28, 28)
    if model_name == "resnet18":
        return torch.zeros(1, 3, 32, 32)
    return torch.arange(SEQUENCE_LENGTH).remainder(vocab_size).unsqueeze(0)  # (1, 64) token ids


@lru_cache(maxsize=None)
def _measure(model_name: str, rate: float, global_rate: float, vocab_size: int,
             resnet_blocks: tuple[int, ...]) -> tuple[int, int, int]:
    """(params, authors' FLOPs, standard FLOPs) of one model; cached, models are deterministic in size."""
    if model_name == "transformer":
        options: dict[str, object] = dict(vocab_size=vocab_size)
    elif model_name == "resnet18":
        options = dict(blocks=resnet_blocks)
    elif model_name == "conv":
        options = {}
    else:
        raise ValueError(f"unknown model {model_name!r}; valid: conv, resnet18, transformer")
    model = build_model(model_name, rate, global_rate=global_rate, **options)
    sample = _sample(model_name, vocab_size)
    return count_params(model), count_flops_authors(model, sample), count_flops_standard(model, sample)


def _check_level(level: str) -> None:
    if level not in LEVEL_RATES:
        raise ValueError(f"unknown level {level!r}; valid levels: "
                         f"{', '.join(f'{k}={v:g}' for k, v in LEVEL_RATES.items())}")


def level_size(model_name: str, level: str, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
               resnet_blocks: tuple[int, ...] = (1, 1, 1, 2), global_level: str | None = None) -> ModelSize:
    """Size of one level; ``ratio`` is against ``global_level`` (default: the level itself, ratio 1)."""
    global_level = level if global_level is None else global_level
    _check_level(level)
    _check_level(global_level)
    rates = (LEVEL_RATES[level], LEVEL_RATES[global_level])
    params, flops, flops_standard = _measure(model_name, *rates, vocab_size, tuple(resnet_blocks))
    global_params = _measure(model_name, rates[1], rates[1], vocab_size, tuple(resnet_blocks))[0]
    return ModelSize(level, params, flops, params * 4 / 2**20, params / global_params, flops_standard)


def normalise_mode(mode: str) -> tuple[tuple[str, int], ...]:
    """``'a-b-c'`` or ``'a1-b1-c1'`` -> ``(('a', 1), ('b', 1), ('c', 1))``; ``'a2-b8'`` -> ``(('a', 2), ('b', 8))``."""
    parts = mode.strip().split("-")
    valid = f"valid levels: {', '.join(f'{k}={v:g}' for k, v in LEVEL_RATES.items())}"
    for part in parts:
        match = re.fullmatch(r"([a-z])(\d*)", part)
        if not match or match.group(1) not in LEVEL_RATES:
            raise ValueError(f"bad model mode {mode!r}: part {part!r} is not a level letter with an optional "
                             f"integer proportion; {valid} (e.g. a-b-c-d-e, a1-b1, a2-b8)")
        if match.group(2) and int(match.group(2)) < 1:
            raise ValueError(f"bad model mode {mode!r}: part {part!r} has proportion 0; proportions are "
                             f"integers >= 1; {valid}")
    pairs = parse_model_mode("-".join(p if p[1:] else f"{p}1" for p in parts))
    levels = [level for level, _ in pairs]
    if len(set(levels)) != len(levels):
        raise ValueError(f"bad model mode {mode!r}: each level may appear once; {valid}")
    wider = [level for level in levels if LEVEL_RATES[level] > LEVEL_RATES[levels[0]]]
    if wider:
        raise ValueError(f"bad model mode {mode!r}: the first level ({levels[0]}) is the global model, "
                         f"but {', '.join(wider)} is wider; put the widest level first")
    return pairs


def mixture_sizes(model_name: str, mode: str, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                  resnet_blocks: tuple[int, ...] = (1, 1, 1, 2)) -> list[ModelSize]:
    """One row per level of ``mode``, then the mixture's row.

    As in the paper's table, a level's row describes that level as a model of its
    own (ratio 1); the mixture's ratio is its mean parameters over the global
    (first) level's.

    The mixture is named by its letters when the proportions are equal (``a-b-c-d-e``
    for ``a1-b1-c1-d1-e1``) and keeps them otherwise (``a2-b8``). A single-level mode
    returns just that level's row, which is also its mixture.
    """
    pairs = normalise_mode(mode)
    rows = [level_size(model_name, level, vocab_size=vocab_size, resnet_blocks=resnet_blocks) for level, _ in pairs]
    if len(rows) == 1:
        return rows
    shares = [share / sum(s for _, s in pairs) for _, share in pairs]

    def mean(values: list[float]) -> float:
        return math.fsum(w * v for w, v in zip(shares, values))

    equal = len({share for _, share in pairs}) == 1
    name = "-".join(level if equal else f"{level}{share}" for level, share in pairs)
    mean_params = mean([r.params for r in rows])
    mixture = ModelSize(name, round(mean_params), round(mean([r.flops for r in rows])), mean([r.mb for r in rows]),
                        mean_params / rows[0].params, round(mean([r.flops_standard for r in rows])))
    return [*rows, mixture]


# ----------------------------------------------------------------------------- table

def human(n: float) -> str:
    """Paper-style units: 9.6M, 330.2M, 604K, 38K; G for billions, the plain number below 1000."""
    if abs(n) < 1000:
        return str(round(n))
    for scale, suffix, digits in ((1e3, "K", 0), (1e6, "M", 1)):
        if abs(round(n / scale, digits)) < 1000:  # 999,999 reads 1.0M, not 1000K
            return f"{n / scale:.{digits}f}{suffix}"
    return f"{n / 1e9:.1f}G"


def format_table(rows: list[ModelSize]) -> str:
    """Aligned plain-text table: paper-style units with the exact numbers in parentheses."""
    header = ["model", "ratio", "params", "FLOPs (authors)", "MB", "FLOPs (standard)"]
    body = [[r.model_mode, f"{r.ratio:.2f}", f"{human(r.params)} ({r.params:,})", f"{human(r.flops)} ({r.flops:,})",
             f"{r.mb:.2f}", f"{human(r.flops_standard)} ({r.flops_standard:,})"] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    notes = ["FLOPs (authors): the paper's counter, one sample, cost x number of weight/bias tensors per layer.",
             "FLOPs (standard): torch.utils.flop_counter, one sample, forward only, multiply-add = 2; not the paper's."]
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body), *notes])
