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
import re
from dataclasses import dataclass
from typing import Any

import torch

LEVEL_RATES: dict[str, float] = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
NORMS = ("bn", "in", "ln", "gn", "none")
MODEL_SPLITS = ("fix", "dynamic")
MODELS = ("conv", "resnet18", "transformer")
IMAGE_DATASETS = {"MNIST": "conv", "CIFAR10": "resnet18"}
MASK_FILLS = ("zero", "-inf")  # see losses.FILLS


class ConfigError(ValueError):
    """A control string or config value that is not valid; the message says what would be."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one HeteroFL experiment (spec sections 2 and 7)."""

    dataset: str = "MNIST"  # MNIST, CIFAR10, or a text corpus in WikiText format (WikiText2, SOTU, ...)
    # --- the control string ---
    federated: bool = True  # fed=0 trains one model centrally on all data (data split "none")
    num_users: int = 100
    frac: float = 0.1  # share of users active per round: ceil(frac * num_users)
    data_split: str = "iid"  # iid | non-iid-N | none
    model_split: str = "fix"  # fix: a level per user for the whole run; dynamic: drawn every round
    model_mode: tuple[tuple[str, int], ...] = (("a", 1),)  # (level, proportion); first = global level
    norm: str = "bn"  # bn (static BN), in, ln, gn, none
    scale: bool = True  # Scaler: divide by (client rate / global rate) in training
    mask: bool = True  # masked cross-entropy over the client's labels
    # --- training (paper presets, spec section 7) ---
    model: str = "conv"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_norm: float = 1.0  # gradient-norm clipping at every local step
    rounds: int = 200
    local_epochs: int = 5
    batch_size_train: int = 10  # rows of 64 tokens for text
    batch_size_test: int = 50  # rows for text: the test stream is laid out as this many rows
    milestones: tuple[int, ...] = (100,)  # MultiStepLR, stepped once per round by the server
    gamma: float = 0.1
    seed: int = 0
    # --- evaluation cost (the paper: every round, sBN over the whole training set) ---
    eval_every: int = 1  # sBN statistics + test every k rounds and at the last round
    sbn_samples: int = 0  # sBN statistics over this many random training samples; 0 = all of them
    sbn_batch_size: int = 0  # batches the sBN statistics average over; 0 = batch_size_train (the authors' loader)
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
        mode = "-".join(f"{level}{share}" for level, share in self.model_mode)
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


def _validate(cfg: ExperimentConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.num_users >= 1, f"num_users must be a positive integer, got {cfg.num_users}")
    need(0 < cfg.frac <= 1, f"frac must be in (0, 1], got {cfg.frac}")
    need(cfg.model_split in MODEL_SPLITS, f"unknown model split {cfg.model_split!r}; valid: {', '.join(MODEL_SPLITS)}")
    need(cfg.norm in NORMS, f"unknown norm {cfg.norm!r}; valid: {', '.join(NORMS)}")
    need(cfg.model in MODELS, f"unknown model {cfg.model!r}; valid: {', '.join(MODELS)}")
    need(cfg.mask_fill in MASK_FILLS, f"unknown mask fill {cfg.mask_fill!r}; valid: {', '.join(MASK_FILLS)}")
    _validate_data_split(cfg.data_split, cfg.federated)
    need(len(cfg.model_mode) >= 1, "model mode needs at least one level, e.g. a1")
    for level, share in cfg.model_mode:
        need(level in LEVEL_RATES, f"unknown level {level!r}; valid levels: {', '.join(LEVEL_RATES)}")
        need(isinstance(share, int) and share >= 1, f"proportion of level {level!r} must be a positive integer, got {share!r}")
    levels = [level for level, _ in cfg.model_mode]
    need(len(set(levels)) == len(levels), f"each level may appear once in the model mode, got {'-'.join(levels)}")
    global_rate = LEVEL_RATES[levels[0]]
    wider = [level for level in levels if LEVEL_RATES[level] > global_rate]
    need(not wider, f"the first level ({levels[0]}) is the global model: levels {wider} are wider than it; "
         f"put the widest level first")
    for name in ("lr", "gamma", "bptt", "embedding_size", "num_heads", "hidden_size", "num_layers",
                 "rounds", "local_epochs", "batch_size_train", "batch_size_test"):
        need(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
    need(cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every}")
    need(cfg.sbn_samples >= 0, f"sbn_samples must be >= 0 (0 = the whole training set), got {cfg.sbn_samples}")
    need(cfg.sbn_batch_size >= 0, f"sbn_batch_size must be >= 0 (0 = batch_size_train), got {cfg.sbn_batch_size}")
    need(cfg.embedding_size % cfg.num_heads == 0, "embedding_size must be a multiple of num_heads")
    need(0 <= cfg.token_mask_rate < 1, f"token_mask_rate must be in [0, 1), got {cfg.token_mask_rate}")
    need(0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}")
    need(all(b >= 1 for b in cfg.resnet_blocks) and len(cfg.resnet_blocks) == 4,
         f"resnet_blocks must be four positive integers, got {cfg.resnet_blocks}")
    need(list(cfg.milestones) == sorted(cfg.milestones), f"milestones must be increasing, got {cfg.milestones}")


def _validate_data_split(split: str, federated: bool) -> None:
    if split == "none":
        if federated:
            raise ConfigError("data split 'none' is for centralised training (fed=0); use iid or non-iid-N")
        return
    if not federated:
        raise ConfigError(f"centralised training (fed=0) takes data split 'none', got {split!r}")
    if split == "iid":
        return
    match = re.fullmatch(r"non-iid-(\d+)", split)
    if not match:
        raise ConfigError(f"unknown data split {split!r}; valid: iid, non-iid-N (N >= 1 labels per user), none")
    if int(match.group(1)) < 1:
        raise ConfigError(f"{split!r}: a non-iid split needs N >= 1 labels per user, e.g. non-iid-2")


def labels_per_user(data_split: str) -> int | None:
    """N of a ``non-iid-N`` split, None for iid."""
    return int(data_split.rsplit("-", 1)[1]) if data_split.startswith("non-iid-") else None


def parse_model_mode(text: str) -> tuple[tuple[str, int], ...]:
    """``'a2-b8'`` -> ``(('a', 2), ('b', 8))``."""
    mode = []
    for part in text.split("-"):
        match = re.fullmatch(r"([a-z])(\d+)", part)
        if not match:
            hint = f"level letter {part[:1]!r} is unknown" if part[:1] not in LEVEL_RATES else f"{part!r} has no proportion"
            raise ConfigError(f"bad model mode {text!r}: {hint}; write levels ({', '.join(LEVEL_RATES)}) "
                              f"each followed by an integer proportion, joined by '-', e.g. a2-b8 or a1-b1-c1-d1-e1")
        if match.group(1) not in LEVEL_RATES:
            raise ConfigError(f"bad model mode {text!r}: unknown level letter {match.group(1)!r}; "
                              f"valid levels: {', '.join(f'{k}={v:g}' for k, v in LEVEL_RATES.items())}")
        mode.append((match.group(1), int(match.group(2))))
    return tuple(mode)


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
    preset = paper_preset(dataset, split)
    return ExperimentConfig(dataset=dataset, **{**preset, **values, **overrides})


def paper_preset(dataset: str, data_split: str = "iid") -> dict[str, Any]:
    """The paper's training settings for a dataset and split (spec section 7)."""
    non_iid = data_split.startswith("non-iid")
    if dataset == "MNIST":
        return dict(model="conv", lr=0.01, rounds=400 if non_iid else 200, local_epochs=5,
                    batch_size_train=10, batch_size_test=50, milestones=(200,) if non_iid else (100,))
    if dataset == "CIFAR10":
        return dict(model="resnet18", lr=0.1, rounds=800 if non_iid else 400, local_epochs=5,
                    batch_size_train=10, batch_size_test=50, milestones=(300, 500) if non_iid else (150, 250))
    # Any other name is a text corpus in WikiText format (WikiText2, SOTU, ...).
    if non_iid:
        raise ConfigError(f"text corpus {dataset!r} supports only the iid split (user i owns row i)")
    return dict(model="transformer", lr=0.1, rounds=200, local_epochs=1,
                batch_size_train=100, batch_size_test=10, milestones=(50, 100))


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
