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
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .config import LEVEL_RATES, ExperimentConfig, check_model_mode, parse_control, parse_model_mode
from .datasets import get_dataset
from .families import get_family, model_builder

COUNTED_PARAMETERS = ("weight", "bias")  # the authors count only these parameter names
BYTES_PER_PARAMETER = 4  # float32
DEFAULT_VOCAB_SIZE = get_dataset("WikiText2").classes  # the authors' WikiText2 vocabulary, without the mask token


@dataclass(frozen=True)
class ModelSize:
    """One row of a size table: a level (``"a"``) or a mixture (``"a-b-c-d-e"``, ``"a2-b8"``)."""

    model_mode: str
    params: int  # entries of every weight and bias (mixture: proportion-weighted mean, rounded)
    flops: int  # authors' convention, one sample (mixture: proportion-weighted mean, rounded)
    mb: float  # megabytes(params) (mixture: weighted mean of the levels' MB)
    ratio: float  # params / global model's params (the global model = first level of the mode)
    flops_standard: int  # torch FlopCounterMode, one sample, forward only; NOT the paper's convention


# ----------------------------------------------------------------------------- counters

def count_params(model: nn.Module) -> int:
    """Entries of every ``weight`` and ``bias`` parameter (the authors' convention)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in COUNTED_PARAMETERS)


def megabytes(params: int) -> float:
    """Space of ``params`` float32 parameters in MB, the paper's way: params * 4 bytes / 2^20."""
    return params * BYTES_PER_PARAMETER / 2**20


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

def paper_config(model_name: str, global_level: str = "a", dataset: str | None = None,
                 **fields: Any) -> ExperimentConfig:
    """The paper's config for ``dataset`` (default: the family's paper dataset) with the global model at
    ``global_level``, ``fields`` (config fields the family reads, e.g. ``resnet_blocks``) replaced: what
    the size tables count."""
    check_model_mode(((global_level, 1),))
    dataset = dataset or get_family(model_name).paper_dataset
    return parse_control(f"1_100_0.1_iid_fix_{global_level}1_bn_1_1", dataset, model=model_name, **fields)


def size_builder(model_name: str, global_level: str = "a", *, vocab_size: int | None = None,
                 dataset: str | None = None, **fields: Any) -> tuple[Callable[[float], nn.Module], torch.Tensor]:
    """``rate -> model`` as the size tables count it, and one input sample for the FLOP counters.

    ``dataset`` (default: the family's paper dataset, e.g. CIFAR10 for the ResNet) gives the classes,
    input channels and image size; ``vocab_size`` replaces a text corpus's vocabulary.
    """
    family = get_family(model_name)
    entry = get_dataset(dataset or family.paper_dataset)
    cfg = paper_config(model_name, global_level, entry.name, **fields)
    classes = vocab_size if vocab_size and family.data_kind == "text" else entry.classes
    if classes is None:
        raise ValueError(f"{entry.name}: its {'vocabulary' if entry.kind == 'text' else 'classes'} come from its "
                         f"files; give the size tables a number ({'--vocab-size' if entry.kind == 'text' else 'classes='})")
    if family.data_kind == "text":
        return model_builder(cfg, classes), torch.arange(cfg.bptt).remainder(classes).unsqueeze(0)  # (1, bptt) ids
    if entry.size is None:
        raise ValueError(f"{entry.name}: its image size comes from its files; register it with size=(height, width) "
                         f"to count its FLOPs")
    return model_builder(cfg, classes, in_channels=entry.channels), torch.zeros(1, entry.channels, *entry.size)


@lru_cache(maxsize=None)
def _measure(model_name: str, level: str, global_level: str, vocab_size: int | None,
             fields: tuple[tuple[str, Any], ...]) -> tuple[int, int, int]:
    """(params, authors' FLOPs, standard FLOPs) of one model; cached, models are deterministic in size."""
    build, sample = size_builder(model_name, global_level, vocab_size=vocab_size, **dict(fields))
    model = build(LEVEL_RATES[level])
    return count_params(model), count_flops_authors(model, sample), count_flops_standard(model, sample)


def level_size(model_name: str, level: str, *, vocab_size: int | None = None, global_level: str | None = None,
               **fields: Any) -> ModelSize:
    """Size of one level; ``ratio`` is against ``global_level`` (default: the level itself, ratio 1).
    ``vocab_size`` and ``fields`` as in :func:`size_builder`."""
    get_family(model_name)  # an unknown name fails here, not inside the cache
    global_level = level if global_level is None else global_level
    check_model_mode(((level, 1),))
    key = tuple(sorted((name, tuple(v) if isinstance(v, list) else v) for name, v in fields.items()))
    params, flops, flops_standard = _measure(model_name, level, global_level, vocab_size, key)
    global_params = _measure(model_name, global_level, global_level, vocab_size, key)[0]
    return ModelSize(level, params, flops, megabytes(params), params / global_params, flops_standard)


def mixture_sizes(model_name: str, mode: str, *, vocab_size: int | None = None, **fields: Any) -> list[ModelSize]:
    """One row per level of ``mode``, then the mixture's row.

    As in the paper's table, a level's row describes that level as a model of its
    own (ratio 1); the mixture's ratio is its mean parameters over the global
    (first) level's.

    ``mode`` may omit proportions of 1 (``a-b-c-d-e``). The mixture is named by its letters
    when the proportions are equal (``a-b-c-d-e`` for ``a1-b1-c1-d1-e1``) and keeps them
    otherwise (``a2-b8``). A single-level mode returns just that level's row, which is also
    its mixture. ``vocab_size`` and ``fields`` as in :func:`size_builder`.
    """
    pairs = parse_model_mode(mode, shorthand=True)
    rows = [level_size(model_name, level, vocab_size=vocab_size, **fields) for level, _ in pairs]
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
