"""Model families: one registry entry per family says everything the rest of the library needs.

An entry names the model class (built as ``model_class(rate, global_rate=..., scale=...,
**options(...))``, with a ``width_axes()`` slicing plan), the kind of data and the
paper's datasets it fits, the config fields only it reads, how the paper's size tables
count it, and what figures call it. Adding a family means writing its model file and
one :func:`register_family` call; nothing else names families.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .models.conv import Conv
from .models.resnet import PreActResNet18
from .models.transformer import Transformer

if TYPE_CHECKING:
    from .config import ExperimentConfig

DATA_KINDS = ("image", "text")
# WikiText2's vocabulary as the authors' code builds it (datasets/lang.py: Vocab): their symbols '<ukn>' and
# '<eos>', then every word of the training split (which holds the corpus's own '<unk>'): 33,279 words, one
# more than the usual 33,278. The size tables count models with it (level a: 73.49 MB); the mask token is extra.
WIKITEXT2_VOCAB = 33279

Options = Callable[["ExperimentConfig", int, "int | None", bool], dict[str, Any]]


@dataclass(frozen=True)
class ModelFamily:
    """One model family and what it fits."""

    name: str  # cfg.model, --model
    display: str  # what figures and tables call it
    model_class: Callable[..., nn.Module]
    data_kind: str  # "image" or "text": the data it takes (ImageData / TextData)
    datasets: tuple[str, ...]  # the paper's datasets for it; the first one's settings size it
    options: Options  # (cfg, classes or vocabulary, input channels or None, track_running_stats) -> constructor options
    sample: Callable[["ExperimentConfig", int], torch.Tensor]  # (cfg, classes) -> one input (batch of 1) to count FLOPs
    classes: int  # classes (the vocabulary for text) of its paper dataset, as the size tables count them
    shown_parameters: tuple[str, ...]  # parameters the mixture explorer draws, most telling first
    config_fields: tuple[str, ...] = ()  # config fields only this family reads (others must keep their defaults)

    def __post_init__(self) -> None:
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"family {self.name!r}: unknown data kind {self.data_kind!r}; "
                             f"valid: {', '.join(DATA_KINDS)}")
        if not self.datasets or not self.shown_parameters:
            raise ValueError(f"family {self.name!r} needs at least one dataset (whose settings size it) "
                             f"and one parameter to show")


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry; its name and datasets must be new."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    for other in FAMILIES.values():
        taken = set(family.datasets) & set(other.datasets)
        if taken:
            raise ValueError(f"family {family.name!r}: datasets {sorted(taken)} already belong to {other.name!r}")
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


def family_for_dataset(dataset: str) -> ModelFamily:
    """The family whose paper datasets include ``dataset``; any other name is a text corpus in
    WikiText format (e.g. SOTU) and gets the first text family."""
    for family in FAMILIES.values():
        if dataset in family.datasets:
            return family
    known = [name for family in FAMILIES.values() for name in family.datasets]
    near = [name for name in known if name.lower() == dataset.lower()]
    if near:
        raise ValueError(f"unknown dataset {dataset!r}: did you mean {near[0]}? (dataset names are case-sensitive)")
    text = [family for family in FAMILIES.values() if family.data_kind == "text"]
    if not text:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(known)}")
    return text[0]


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


def _mnist_image(cfg: ExperimentConfig, classes: int) -> torch.Tensor:
    return torch.zeros(1, 1, 28, 28)


def _cifar10_image(cfg: ExperimentConfig, classes: int) -> torch.Tensor:
    return torch.zeros(1, 3, 32, 32)


def _token_window(cfg: ExperimentConfig, classes: int) -> torch.Tensor:
    return torch.arange(cfg.bptt).remainder(classes).unsqueeze(0)  # (1, bptt) token ids


SBN_FIELDS = ("sbn_samples", "sbn_batch_size")  # the server's sBN pass: families with BatchNorm

register_family(ModelFamily(
    name="conv", display="CNN", model_class=Conv, data_kind="image", datasets=("MNIST",),
    options=_image_options, sample=_mnist_image, classes=10, config_fields=SBN_FIELDS,
    shown_parameters=("features.5.weight", "features.0.weight", "head.weight")))
register_family(ModelFamily(
    name="resnet18", display="PreAct ResNet18", model_class=PreActResNet18, data_kind="image", datasets=("CIFAR10",),
    options=_resnet_options, sample=_cifar10_image, classes=10, config_fields=("resnet_blocks", *SBN_FIELDS),
    shown_parameters=("stages.1.0.conv1.weight", "stages.1.0.shortcut.weight", "stem.weight", "head.weight")))
register_family(ModelFamily(
    name="transformer", display="Transformer", model_class=Transformer, data_kind="text", datasets=("WikiText2",),
    options=_transformer_options, sample=_token_window, classes=WIKITEXT2_VOCAB,
    config_fields=("bptt", "token_mask_rate", "embedding_size", "num_heads", "hidden_size", "num_layers", "dropout"),
    shown_parameters=("layers.0.attention.q.weight", "layers.0.attention.o.weight", "layers.0.linear1.weight",
                      "output.weight")))
