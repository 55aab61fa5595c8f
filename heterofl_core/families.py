"""Model families: one registry entry per family says everything the rest of the library needs.

An entry names the model class (built as ``model_class(rate, global_rate=..., scale=...,
**options(...))``, with a ``width_axes()`` slicing plan), the data it is the default for
(a kind, and for images the channels: the CNN takes grey images, the ResNet colour ones),
the paper's training settings for it, the config fields only it reads, the paper's dataset
its size tables count, and what figures call it. Adding a family means writing its model
file and one :func:`register_family` call; nothing else names families.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from .models.conv import Conv
from .models.resnet import PreActResNet18
from .models.transformer import Transformer

if TYPE_CHECKING:
    from .config import ExperimentConfig

DATA_KINDS = ("image", "text")

Options = Callable[["ExperimentConfig", int, "int | None", bool], dict[str, Any]]


@dataclass(frozen=True)
class ModelFamily:
    """One model family and what it fits."""

    name: str  # cfg.model, --model
    display: str  # what figures and tables call it
    model_class: Callable[..., nn.Module]
    data_kind: str  # "image" or "text": the data it takes (ImageData / TextData)
    channels: tuple[int, ...]  # image channels it is the default family for (1: grey, 3: colour); () for text
    paper_dataset: str  # the dataset the paper trains it on: its size tables count it with this data
    settings: dict[str, dict[str, Any]]  # the paper's training settings, "iid" and "non-iid" (label skew)
    options: Options  # (cfg, classes or vocabulary, input channels or None, track_running_stats) -> constructor options
    shown_parameters: tuple[str, ...]  # parameters the mixture explorer draws, most telling first
    config_fields: tuple[str, ...] = ()  # config fields only this family reads (others must keep their defaults)

    def __post_init__(self) -> None:
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"family {self.name!r}: unknown data kind {self.data_kind!r}; "
                             f"valid: {', '.join(DATA_KINDS)}")
        if not self.shown_parameters:
            raise ValueError(f"family {self.name!r} needs at least one parameter to show")


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry; its name must be new."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family added by :func:`register_family`."""
    get_family(name)
    del FAMILIES[name]


def get_family(name: str) -> ModelFamily:
    """The family called ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for_data(kind: str, channels: int | None = None) -> ModelFamily:
    """The default family for data of ``kind`` ("image" or "text") with ``channels`` (images): the first
    registered family that says it is the default for them."""
    for family in FAMILIES.values():
        if family.data_kind == kind and (kind == "text" or channels in family.channels):
            return family
    raise ValueError(f"no model family is the default for {kind} data" + (f" with {channels} channels" if channels
                     else "") + f"; families: {', '.join(f'{f.name} ({f.data_kind})' for f in FAMILIES.values())}")


def build_model(name: str, rate: float = 1.0, **options: object) -> nn.Module:
    """The registered family ``name`` at width ``rate``."""
    return get_family(name).model_class(rate, **options)


def model_builder(cfg: ExperimentConfig, num_classes: int, track_running_stats: bool = False,
                  in_channels: int | None = None) -> Callable[[float], nn.Module]:
    """``rate -> model`` for this experiment: ``num_classes`` is the vocabulary size for text;
    ``in_channels`` defaults to the family's paper dataset (the model class's default)."""
    options = get_family(cfg.model).options(cfg, num_classes, in_channels, track_running_stats)
    return partial(build_model, cfg.model, global_rate=cfg.global_rate, scale=cfg.scale, **options)


# ----------------------------------------------------------------------------- the paper's three families

def _image_options(cfg: ExperimentConfig, classes: int, in_channels: int | None, track: bool) -> dict[str, Any]:
    """Norm, classes and (when known from the data) input channels; else the class's default."""
    options: dict[str, Any] = dict(norm=cfg.norm, track_running_stats=track, num_classes=classes)
    return options if in_channels is None else {**options, "in_channels": in_channels}


def _resnet_options(cfg: ExperimentConfig, classes: int, in_channels: int | None, track: bool) -> dict[str, Any]:
    return {**_image_options(cfg, classes, in_channels, track), "blocks": cfg.resnet_blocks}


def _transformer_options(cfg: ExperimentConfig, classes: int, in_channels: int | None, track: bool) -> dict[str, Any]:
    """LayerNorm only: the config's norm does not apply (the control string still carries it)."""
    return dict(vocab_size=classes, embed=cfg.embedding_size, heads=cfg.num_heads, hidden=cfg.hidden_size,
                layers=cfg.num_layers, dropout=cfg.dropout, bptt=cfg.bptt)


SBN_FIELDS = ("sbn_samples", "sbn_batch_size")  # the server's sBN pass: families with BatchNorm

# The paper's settings (spec section 7); label skew (non-iid-N, dirALPHA) trains longer, with later milestones.
_MNIST = dict(lr=0.01, rounds=200, local_epochs=5, batch_size_train=10, batch_size_test=50, milestones=(100,))
_CIFAR10 = dict(lr=0.1, rounds=400, local_epochs=5, batch_size_train=10, batch_size_test=50, milestones=(150, 250))

register_family(ModelFamily(
    name="conv", display="CNN", model_class=Conv, data_kind="image", channels=(1,), paper_dataset="MNIST",
    settings={"iid": _MNIST, "non-iid": {**_MNIST, "rounds": 400, "milestones": (200,)}},
    options=_image_options, config_fields=SBN_FIELDS,
    shown_parameters=("features.5.weight", "features.0.weight", "head.weight")))
register_family(ModelFamily(
    name="resnet18", display="PreAct ResNet18", model_class=PreActResNet18, data_kind="image", channels=(3,),
    paper_dataset="CIFAR10",
    settings={"iid": _CIFAR10, "non-iid": {**_CIFAR10, "rounds": 800, "milestones": (300, 500)}},
    options=_resnet_options, config_fields=("resnet_blocks", *SBN_FIELDS),
    shown_parameters=("stages.1.0.conv1.weight", "stages.1.0.shortcut.weight", "stem.weight", "head.weight")))
register_family(ModelFamily(
    name="transformer", display="Transformer", model_class=Transformer, data_kind="text", channels=(),
    paper_dataset="WikiText2",  # 100 rows for training: the paper's users (text takes the iid split only)
    settings={"iid": dict(lr=0.1, rounds=200, local_epochs=1, batch_size_train=100, batch_size_test=10,
                          milestones=(50, 100))},
    options=_transformer_options,
    config_fields=("bptt", "token_mask_rate", "embedding_size", "num_heads", "hidden_size", "num_layers", "dropout"),
    shown_parameters=("layers.0.attention.q.weight", "layers.0.attention.o.weight", "layers.0.linear1.weight",
                      "output.weight")))
