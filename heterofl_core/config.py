"""The experiment configuration: a frozen dataclass, the paper's control string, and presets.

The authors name a run with a control string
``fed_numusers_frac_datasplit_modelsplit_modelmode_norm_scale_mask``, e.g.
``1_100_0.1_iid_fix_a2-b8_bn_1_1`` (spec section 2). ``parse_control`` turns it
into an :class:`ExperimentConfig` filled with the paper's hyperparameters for the
dataset (spec section 7); ``ExperimentConfig.control`` formats it back exactly.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
import typing
from typing import Any, Callable, Iterable

import torch

from .datasets import Dataset, get_dataset
from .families import FAMILIES, ModelFamily, family_for_data, get_family

LEVEL_RATES: dict[str, float] = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}

NORMS = ("bn", "in", "ln", "gn", "none")
MODEL_SPLITS = ("fix", "dynamic")
MASK_FILLS = ("zero", "-inf")  # see losses.FILLS
SBN_SOURCES = ("server", "clients")  # see federated.Federation.evaluation_model
EXTRACTIONS = ("static", "rolling", "random")  # see extraction.py
PARTICIPANTS = ("all", "widest")  # see federated.Federation.plan_round
_VALID_LEVELS = f"valid levels: {', '.join(f'{k}={v:g}' for k, v in LEVEL_RATES.items())}"


def level_of(rate: float) -> str:
    """The level whose width rate is ``rate`` (``LEVEL_RATES``' inverse)."""
    return next(level for level, level_rate in LEVEL_RATES.items() if level_rate == rate)


class ConfigError(ValueError):
    """A control string or config value that is not valid; the message says what would be."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one HeteroFL experiment (spec sections 2 and 7)."""

    dataset: str = "MNIST"  # a registered dataset (datasets.py), or a folder of one's own under the data root
    # --- the control string ---
    federated: bool = True  # fed=0 trains one model centrally on all data (data split "none")
    num_users: int = 100
    frac: float = 0.1  # share of users active per round: ceil(frac * num_users)
    data_split: str = "iid"  # iid | non-iid-N | dirALPHA | none
    model_split: str = "fix"  # fix: a level per user for the whole run; dynamic: drawn every round
    model_mode: tuple[tuple[str, int], ...] = (("a", 1),)  # (level, proportion); first = global level
    norm: str = "bn"  # bn (static BN), in, ln, gn, none; the transformer always uses LayerNorm (name only)
    scale: bool = True  # Scaler: divide by (client rate / global rate) in training
    mask: bool = True  # masked cross-entropy over the client's labels
    # --- training (paper presets, spec section 7) ---
    model: str = "conv"  # a registered family (families.py); the presets pick the dataset's
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_norm: float = 1.0  # gradient-norm clipping at every local step
    rounds: int = 200
    local_epochs: int = 5
    batch_size_train: int = 10  # images per batch; text: rows the training stream is laid out in (= num_users)
    batch_size_test: int = 50  # rows for text: the test stream is laid out as this many rows
    milestones: tuple[int, ...] = (100,)  # MultiStepLR, stepped once per round by the server
    gamma: float = 0.1
    seed: int = 0
    # --- evaluation cost (the paper: every round, sBN over the whole training set) ---
    eval_every: int = 1  # sBN statistics + test every k rounds and at the last round
    sbn_samples: int = 0  # sBN statistics over this many random training samples; 0 = all of them
    sbn_batch_size: int = 0  # batches the sBN statistics average over; 0 = batch_size_train (the authors' loader)
    extraction: str = "static"  # which channels a client holds: static (the paper), rolling (FedRolex), random
    sbn_source: str = "server"  # server: one pass over the training set (the paper); clients: each user's own pass, combined
    # all: every sampled client trains at its level (HeteroFL); widest: only sampled clients at the global
    # model's level train, the rest sit the round out (FedAvg restricted to the clients that can hold the
    # full model: a baseline)
    participants: str = "all"
    # --- model options ---
    resnet_blocks: tuple[int, ...] = (1, 1, 1, 2)  # the paper's numbers; the authors' later code: (2, 2, 2, 2)
    mask_fill: str = "zero"  # what replaces logits of absent classes: zero (authors) or -inf
    bptt: int = 64  # tokens per sequence
    token_mask_rate: float = 0.15  # share of input tokens replaced by the mask token (train and eval)
    embedding_size: int = 256
    num_heads: int = 8
    hidden_size: int = 512  # transformer feed-forward width
    num_layers: int = 4
    dropout: float = 0.2

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def control(self) -> str:
        """The authors' control string for this config."""
        mode = format_model_mode(self.model_mode)
        return "_".join([
            str(int(self.federated)), str(self.num_users), _format_frac(self.frac), self.data_split,
            self.model_split, mode, self.norm, str(int(self.scale)), str(int(self.mask)),
        ])

    @property
    def global_rate(self) -> float:
        """Width rate of the global model: the first level of the model mode."""
        return LEVEL_RATES[self.model_mode[0][0]]

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(level for level, _ in self.model_mode)

    @property
    def sbn_batch(self) -> int:
        """Batches the sBN statistics average over: ``sbn_batch_size``, else the training batch size."""
        return self.sbn_batch_size or self.batch_size_train

    @property
    def active_users(self) -> int:
        """Users trained per round: ceil(frac * num_users)."""
        return max(1, math.ceil(self.frac * self.num_users - 1e-9))

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the control string for reference."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model_mode"] = [list(pair) for pair in self.model_mode]
        out["milestones"] = list(self.milestones)
        out["resnet_blocks"] = list(self.resnet_blocks)
        out["control"] = self.control
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names - {"control"}
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}; valid fields: {sorted(names)}")
        kwargs = {k: v for k, v in values.items() if k in names}
        for key in ("milestones", "resnet_blocks"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if "model_mode" in kwargs:
            kwargs["model_mode"] = tuple((str(l), int(p)) for l, p in kwargs["model_mode"])
        return cls(**kwargs)


def _format_frac(frac: float) -> str:
    """Shortest text that parses back to ``frac``: 0.1, 1, 0.05 (repr only when %g would round)."""
    short = f"{frac:g}"
    return short if float(short) == frac else repr(frac)


# Numeric fields: (integer?, test, what is valid).
NUMERIC_FIELDS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "num_users": (True, lambda v: v >= 1, "a positive integer"),
    "frac": (False, lambda v: 0 < v <= 1, "in (0, 1]"),
    "lr": (False, lambda v: v > 0, "positive"),
    "momentum": (False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (False, lambda v: v >= 0, ">= 0"),
    "clip_norm": (False, lambda v: v > 0, "positive (the gradient-norm bound of every local step)"),
    "rounds": (True, lambda v: v >= 1, "a positive integer"),
    "local_epochs": (True, lambda v: v >= 1, "a positive integer"),
    "batch_size_train": (True, lambda v: v >= 1, "a positive integer"),
    "batch_size_test": (True, lambda v: v >= 1, "a positive integer"),
    "gamma": (False, lambda v: v > 0, "positive"),
    "seed": (True, lambda v: v >= 0, "an integer >= 0"),
    "eval_every": (True, lambda v: v >= 1, "a positive integer"),
    "sbn_samples": (True, lambda v: v >= 0, "an integer >= 0 (0 = the whole training set)"),
    "sbn_batch_size": (True, lambda v: v >= 0, "an integer >= 0 (0 = batch_size_train)"),
    "bptt": (True, lambda v: v >= 1, "a positive integer"),
    "token_mask_rate": (False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "embedding_size": (True, lambda v: v >= 1, "a positive integer"),
    "num_heads": (True, lambda v: v >= 1, "a positive integer"),
    "hidden_size": (True, lambda v: v >= 1, "a positive integer"),
    "num_layers": (True, lambda v: v >= 1, "a positive integer"),
    "dropout": (False, lambda v: 0 <= v < 1, "in [0, 1)"),
}


def _is_number(value: Any, integer: bool) -> bool:
    """An int (not a bool), or for a float field any finite real number."""
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real) and math.isfinite(value)


def _family(name: str) -> ModelFamily:
    try:
        return get_family(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _dataset(name: str) -> Dataset:
    try:
        return get_dataset(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def dataset_family(dataset: str) -> ModelFamily:
    """The model family that follows from the data: the CNN for grey images, the ResNet for colour ones,
    the Transformer for text (:func:`families.family_for_data`)."""
    entry = _dataset(dataset)
    try:
        return family_for_data(entry.kind, entry.channels)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _validate(cfg: ExperimentConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name, (integer, valid, text) in NUMERIC_FIELDS.items():
        value = getattr(cfg, name)
        need(_is_number(value, integer) and valid(value), f"{name} must be {text}, got {value!r}")
    need(cfg.model_split in MODEL_SPLITS, f"unknown model split {cfg.model_split!r}; valid: {', '.join(MODEL_SPLITS)}")
    need(cfg.norm in NORMS, f"unknown norm {cfg.norm!r}; valid: {', '.join(NORMS)}")
    need(cfg.extraction in EXTRACTIONS, f"unknown extraction {cfg.extraction!r}; valid: {', '.join(EXTRACTIONS)}")
    need(cfg.sbn_source in SBN_SOURCES, f"unknown sbn_source {cfg.sbn_source!r}; valid: {', '.join(SBN_SOURCES)}")
    need(cfg.participants in PARTICIPANTS,
         f"unknown participants {cfg.participants!r}; valid: all (every sampled client trains at its level: "
         f"HeteroFL), widest (only sampled clients at the global model's level train: FedAvg on the clients "
         f"that can hold it)")
    need(cfg.sbn_source == "server" or cfg.sbn_samples == 0,
         "sbn_samples subsamples the server's pass; with sbn_source=clients every user passes over all its data")
    need(cfg.mask_fill in MASK_FILLS, f"unknown mask fill {cfg.mask_fill!r}; valid: {', '.join(MASK_FILLS)}")
    _validate_data_split(cfg.data_split, cfg.federated)
    check_model_mode(cfg.model_mode)
    need(cfg.embedding_size % cfg.num_heads == 0, "embedding_size must be a multiple of num_heads")
    need(len(cfg.resnet_blocks) == 4 and all(_is_number(b, True) and b >= 1 for b in cfg.resnet_blocks),
         f"resnet_blocks must be four positive integers, got {cfg.resnet_blocks}")
    need(all(_is_number(m, True) and m >= 1 for m in cfg.milestones) and list(cfg.milestones) == sorted(cfg.milestones),
         f"milestones must be increasing positive round numbers, got {cfg.milestones}")
    _validate_family(cfg)


def _validate_family(cfg: ExperimentConfig) -> None:
    """The model exists, fits the dataset, and every field it does not read keeps its default."""
    family, entry = _family(cfg.model), _dataset(cfg.dataset)
    if entry.kind != family.data_kind:
        fitting = [f.name for f in FAMILIES.values() if f.data_kind == entry.kind]
        raise ConfigError(f"model {cfg.model!r} takes {family.data_kind} data, but {cfg.dataset} is {entry.kind} "
                          f"data: use {' or '.join(fitting)}")
    for field in dataclasses.fields(cfg):
        readers = [f.name for f in FAMILIES.values() if field.name in f.config_fields]
        value = getattr(cfg, field.name)
        if readers and cfg.model not in readers and value != field.default:
            raise ConfigError(f"{field.name}={value!r} applies only to model {' / '.join(readers)}, not to "
                              f"{cfg.model!r}: leave it at its default ({field.default!r})")
    if family.data_kind == "text":
        if cfg.data_split not in ("iid", "none"):
            raise ConfigError(f"text corpus {cfg.dataset!r} supports only the iid split (user i owns row i), "
                              f"got {cfg.data_split!r}")
        if cfg.batch_size_train != cfg.num_users:
            raise ConfigError(f"for text, batch_size_train is the number of rows the training stream is laid out "
                              f"in, one per user: it must equal num_users ({cfg.num_users}), "
                              f"got {cfg.batch_size_train}")


def _validate_data_split(split: str, federated: bool) -> None:
    if split == "none":
        if federated:
            raise ConfigError("data split 'none' is for centralised training (fed=0); use iid or non-iid-N")
        return
    if not federated:
        raise ConfigError(f"centralised training (fed=0) takes data split 'none', got {split!r}")
    if split == "iid":
        return
    if split.startswith("dir"):
        if dirichlet_alpha(split) is None:
            raise ConfigError(f"{split!r}: a Dirichlet split is dirALPHA with ALPHA > 0, e.g. dir0.3 (small: few "
                              f"labels per user; large: near iid)")
        return
    match = re.fullmatch(r"non-iid-(\d+)", split)
    if not match:
        raise ConfigError(f"unknown data split {split!r}; valid: iid, non-iid-N (N >= 1 labels per user), dirALPHA "
                          f"(Dirichlet label skew, ALPHA > 0, e.g. dir0.3), none")
    if int(match.group(1)) < 1:
        raise ConfigError(f"{split!r}: a non-iid split needs N >= 1 labels per user, e.g. non-iid-2")


def dirichlet_alpha(data_split: str) -> float | None:
    """ALPHA of a ``dirALPHA`` split (Dirichlet label skew, e.g. ``dir0.3``), None for any other split or a bad ALPHA."""
    if not data_split.startswith("dir"):
        return None
    try:
        alpha = float(data_split.removeprefix("dir"))
    except ValueError:
        return None
    return alpha if 0 < alpha < float("inf") else None


def labels_per_user(data_split: str) -> int | None:
    """N of a ``non-iid-N`` split (N >= 1), None for any other split."""
    match = re.fullmatch(r"non-iid-(\d+)", data_split)
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


def parse_model_mode(text: str, *, shorthand: bool = False) -> tuple[tuple[str, int], ...]:
    """``'a2-b8'`` -> ``(('a', 2), ('b', 8))``; with ``shorthand`` a level may omit its proportion,
    meaning 1 (``'a-b-c'`` = ``'a1-b1-c1'``). The one parser of model modes; checks :func:`check_model_mode`."""
    mode = []
    for part in text.strip().split("-"):
        letter, digits = part[:1], part[1:]
        problem = ""
        if letter not in LEVEL_RATES:
            problem = f"unknown level letter {letter!r}" if letter else "empty"
        elif digits and not (digits.isascii() and digits.isdigit()):
            problem = "not a level letter followed by an integer proportion"
        elif not digits and not shorthand:
            problem = f"{letter!r} has no proportion"
        elif digits and int(digits) < 1:
            problem = f"proportion of level {letter!r} must be >= 1"
        if problem:
            omit = " (or none, meaning 1)" if shorthand else ""
            raise ConfigError(f"bad model mode {text!r}: part {part!r}: {problem}; {_VALID_LEVELS}; write levels "
                              f"each followed by an integer proportion >= 1{omit}, joined by '-', e.g. a2-b8 or "
                              f"a1-b1-c1-d1-e1")
        mode.append((letter, int(digits or 1)))
    check_model_mode(tuple(mode))
    return tuple(mode)


def check_model_mode(mode: tuple[tuple[str, int], ...]) -> None:
    """Refuse a model mode without levels, with unknown levels, proportions below 1, a level twice,
    or a level wider than the first (the global model)."""
    if not mode:
        raise ConfigError("model mode needs at least one level, e.g. a1")
    for level, share in mode:
        if level not in LEVEL_RATES:
            raise ConfigError(f"unknown level {level!r}; {_VALID_LEVELS}")
        if not _is_number(share, True) or share < 1:
            raise ConfigError(f"proportion of level {level!r} must be a positive integer, got {share!r}")
    levels = [level for level, _ in mode]
    if len(set(levels)) != len(levels):
        raise ConfigError(f"each level may appear once in the model mode, got {'-'.join(levels)}")
    wider = [level for level in levels if LEVEL_RATES[level] > LEVEL_RATES[levels[0]]]
    if wider:
        raise ConfigError(f"the first level ({levels[0]}) is the global model: levels {wider} are wider than it; "
                          f"put the widest level first")


def format_model_mode(mode: tuple[tuple[str, int], ...]) -> str:
    """``(('a', 2), ('b', 8))`` -> ``'a2-b8'`` (the control string's spelling)."""
    return "-".join(f"{level}{share}" for level, share in mode)


CONTROL_FIELDS = ("fed", "num_users", "frac", "data_split", "model_split", "model_mode", "norm", "scale", "mask")


def parse_control(control: str, dataset: str = "MNIST", **overrides: Any) -> ExperimentConfig:
    """Parse a control string such as ``1_100_0.1_iid_fix_a2-b8_bn_1_1`` into a config.

    The paper's hyperparameters for ``dataset`` and the split fill the rest
    (:func:`paper_preset`); ``overrides`` replace any field last.
    """
    parts = control.strip().split("_")
    if len(parts) != len(CONTROL_FIELDS):
        raise ConfigError(f"control string {control!r} has {len(parts)} parts, expected {len(CONTROL_FIELDS)}: "
                          f"{', '.join(CONTROL_FIELDS)}, joined by '_' (e.g. 1_100_0.1_iid_fix_a2-b8_bn_1_1)")
    fed, users, frac, split, msplit, mode, norm, scale, mask = parts

    def flag(name: str, text: str) -> bool:
        if text not in ("0", "1"):
            raise ConfigError(f"control string part {name}={text!r} must be 0 or 1")
        return text == "1"

    def number(name: str, text: str, kind: type) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"control string part {name}={text!r} is not a{'n integer' if kind is int else ' number'}") from None

    values = dict(
        federated=flag("fed", fed), num_users=number("num_users", users, int), frac=number("frac", frac, float),
        data_split=split, model_split=msplit, model_mode=parse_model_mode(mode), norm=norm,
        scale=flag("scale", scale), mask=flag("mask", mask),
    )
    _validate_data_split(split, values["federated"])
    settings = {**paper_preset(dataset, split), **values, **overrides}
    if _family(settings["model"]).data_kind == "text" and "batch_size_train" not in overrides:
        settings["batch_size_train"] = settings["num_users"]  # the training stream: one row per user
    return ExperimentConfig(dataset=dataset, **settings)


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for any config field, the value converted to the field's type."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    hints = typing.get_type_hints(ExperimentConfig)
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    if not sep or key not in fields:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with KEY one of: {', '.join(sorted(fields))}")
    kind = hints[key]
    try:
        if kind is bool:
            if raw.lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return key, raw.lower() in ("1", "true")
        if kind in (int, float, str):
            return key, kind(raw)
        if key == "model_mode":
            return key, parse_model_mode(raw)
        return key, tuple(int(part) for part in raw.split(",") if part)  # milestones, resnet_blocks
    except ValueError:
        raise ConfigError(f"--set {key}={raw!r}: not a valid {getattr(kind, '__name__', kind)}") from None


def parse_overrides(texts: Iterable[str]) -> dict[str, Any]:
    """``{field: value}`` from ``KEY=VALUE`` texts (:func:`parse_override`; a later one wins)."""
    return dict(parse_override(text) for text in texts)


def paper_preset(dataset: str, data_split: str = "iid") -> dict[str, Any]:
    """The paper's training settings for a dataset and split (spec section 7): those of the dataset's
    family (:func:`dataset_family`), so Fashion-MNIST takes MNIST's recipe and CIFAR-100 CIFAR10's.
    Label skew (non-iid-N, dirALPHA) takes the non-iid settings where the family has them."""
    family = dataset_family(dataset)
    non_iid = data_split.startswith(("non-iid", "dir")) and "non-iid" in family.settings
    return dict(model=family.name, **family.settings["non-iid" if non_iid else "iid"])


def assign_fixed_levels(model_mode: tuple[tuple[str, int], ...], num_users: int) -> list[str]:
    """Level of each user under ``fix`` (spec section 2).

    Levels are laid out in order, each repeated ``(num_users // sum(proportions)) * proportion``
    times; users left over (when num_users is not a multiple of the proportions' sum)
    get the last level. ``a2-b8`` over 100 users: users 0-19 are a, 20-99 are b;
    ``a1-b1-c1`` over 10 users: 3 a, 3 b, 4 c.
    """
    unit = num_users // sum(share for _, share in model_mode)
    levels = [level for level, share in model_mode for _ in range(unit * share)]
    return levels + [model_mode[-1][0]] * (num_users - len(levels))


def draw_dynamic_levels(model_mode: tuple[tuple[str, int], ...], num_users: int,
                        generator: torch.Generator) -> list[str]:
    """Level of each user for one round under ``dynamic``: drawn independently, P proportional to the proportions."""
    shares = torch.tensor([float(share) for _, share in model_mode])
    picks = torch.multinomial(shares / shares.sum(), num_users, replacement=True, generator=generator)
    return [model_mode[i][0] for i in picks.tolist()]
