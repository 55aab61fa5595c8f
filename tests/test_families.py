"""The model-family registry: one entry per family, a fourth family end to end, plans the slicer
refuses, and config fields that must mean something for the chosen family."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heterofl_core.cli import main
from heterofl_core.config import LEVEL_RATES, ConfigError, ExperimentConfig, parse_control
from heterofl_core.data import ImageData
from heterofl_core.datasets import get_dataset, image_folder, register_dataset, unregister_dataset
from heterofl_core.families import (FAMILIES, ModelFamily, family_for_data, get_family, model_builder,
                                    register_family, unregister_family)
from heterofl_core.federated import run_experiment
from heterofl_core.models.layers import make_scaler, width
from heterofl_core.sizes import level_size, mixture_sizes, size_builder
from heterofl_core.slicing import FULL, LABELS, PREFIX, Axes, Heads, Slicer, default_axes, module_axes
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

SMALL_VOCAB = 50


# ----------------------------------------------------------------------------- a fourth family: its model file

class TwoLayerMLP(nn.Module):
    """Flatten -> Linear(hidden * rate) -> Scaler -> ReLU -> Linear(classes)."""

    def __init__(self, rate: float = 1.0, *, global_rate: float = 1.0, scale: bool = True, in_features: int = 16,
                 hidden: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, width(rate, hidden))
        self.scaler = make_scaler(scale, rate, global_rate)
        self.head = nn.Linear(width(rate, hidden), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.scaler(self.hidden(x.flatten(1)))))  # (N, C, H, W) -> (N, classes)

    def width_axes(self) -> dict[str, Axes]:
        """The first layer keeps its inputs; the head keeps all classes."""
        return {**default_axes(self), **module_axes(self, self.hidden, weight=(PREFIX, FULL)),
                **module_axes(self, self.head, weight=(LABELS, PREFIX), bias=(LABELS,))}


# ----------------------------------------------------------------------------- ... and its one entry

def _mlp_options(cfg: ExperimentConfig, classes: int, in_channels: int | None, track: bool) -> dict:
    return dict(num_classes=classes, in_features=(in_channels or 1) * 4 * 4)


MLP = ModelFamily(name="mlp", display="Two-layer MLP", model_class=TwoLayerMLP, data_kind="image", channels=(),
                  paper_dataset="TOY", settings={"iid": dict(lr=0.05, rounds=3)}, options=_mlp_options,
                  shown_parameters=("hidden.weight", "head.weight"))
TOY = image_folder("TOY", channels=1, classes=4, size=(4, 4), about="4x4 grey images whose bright row is the label")


@pytest.fixture
def mlp() -> Iterator[ModelFamily]:
    register_family(MLP)
    register_dataset(TOY)
    try:
        yield MLP
    finally:
        unregister_family(MLP.name)
        unregister_dataset(TOY.name)


def toy_images(n_train: int = 64, n_test: int = 32, classes: int = 4) -> ImageData:
    """4x4 one-channel images whose bright row is the label."""
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % classes
        x = torch.randn(n, 1, 4, 4, generator=generator) * 0.1
        x[torch.arange(n), 0, labels] += 1.0
        return x, labels

    (train_x, train_y), (test_x, test_y) = images(n_train), images(n_test)
    return ImageData("TOY", "memory", train_x, train_y, test_x, test_y, num_classes=classes, augment=False)


def test_a_fourth_family_is_a_model_file_and_one_entry(mlp):
    cfg = parse_control("1_4_1_iid_fix_a1-c1_none_1_1", "TOY", model="mlp", rounds=1, local_epochs=1,
                        batch_size_train=8)
    assert cfg.model == "mlp" and cfg.lr == 0.01  # grey images: the CNN's paper settings
    assert family_for_data("image", 1).name == "conv"
    frame = run_experiment(cfg, data=toy_images(), device="cpu", quiet=True)
    test = frame[frame["split"] == "test"].set_index("metric")["value"]
    assert set(frame["round"]) == {1}
    assert 0 <= test["global_accuracy"] <= 100 and math.isfinite(test["global_loss"])
    # the size tables and the command line know it too
    a, c = level_size("mlp", "a"), level_size("mlp", "c")
    assert a.params == (16 * 32 + 32) + (32 * 4 + 4) and c.params == (16 * 8 + 8) + (8 * 4 + 4)
    assert mixture_sizes("mlp", "a-c")[-1].params == round((a.params + c.params) / 2)
    assert main(["sizes", "--model", "mlp", "--mode", "a-c", "--json"]) == 0


def test_a_registered_family_can_be_removed_and_names_are_unique(mlp):
    with pytest.raises(ValueError, match="'mlp' is already registered"):
        register_family(MLP)
    unregister_family("mlp")
    with pytest.raises(ValueError, match="unknown model 'mlp'"):
        get_family("mlp")
    register_family(MLP)  # the fixture removes it again


# ----------------------------------------------------------------------------- the registry

def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid: conv, resnet18, transformer"):
        get_family("vgg")
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        ExperimentConfig(model="vgg")
    with pytest.raises(ConfigError, match="did you mean MNIST"):
        parse_control("1_100_0.1_iid_fix_a1_bn_1_1", "mnist")
    # the family follows the data: grey images the CNN, colour ones the ResNet, text the Transformer
    assert [parse_control("1_100_0.1_iid_fix_a1_bn_1_1", name).model for name in
            ("MNIST", "FashionMNIST", "KMNIST", "EMNIST", "CIFAR10", "CIFAR100", "SVHN", "WikiText2", "SOTU")] == \
        ["conv"] * 4 + ["resnet18"] * 3 + ["transformer"] * 2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_builds_at_every_level_and_its_plan_is_accepted(name):
    family = get_family(name)
    cfg = parse_control("1_10_1_iid_fix_a1_bn_1_1", family.paper_dataset)
    build, sample = size_builder(name, vocab_size=SMALL_VOCAB)
    classes = SMALL_VOCAB if family.data_kind == "text" else get_dataset(family.paper_dataset).classes
    slicer = Slicer(build, cfg.global_rate)
    state = build(cfg.global_rate).state_dict()
    for level, rate in LEVEL_RATES.items():
        model = build(rate)
        model.load_state_dict(slicer.split(state, rate), strict=True)
        assert model.eval()(sample).shape[-1] == classes, level
    assert all(key in dict(build(1.0).named_parameters()) for key in family.shown_parameters)
    assert family.display and family.data_kind in ("image", "text")


# ----------------------------------------------------------------------------- plans the slicer refuses

def _with_head_rules(rules: dict[str, Axes]) -> type[nn.Module]:
    class Planned(TwoLayerMLP):
        def width_axes(self) -> dict[str, Axes]:
            return {**super().width_axes(), **module_axes(self, self.head, **rules)}
    return Planned


@pytest.mark.parametrize("rules, words", [
    (dict(weight=(PREFIX, LABELS)), ["head.weight", "LABELS on axis 1", "axis 0 only"]),
    (dict(weight=(Heads(3), PREFIX)), ["head.weight", "axis 0 of size 4", "3 equal heads"]),
    (dict(bias=(LABELS, FULL)), ["head.bias", "1 axes but 2 rules"]),
    (dict(bias=("suffix",)), ["head.bias", "unknown rule 'suffix'"]),
])
def test_slicer_refuses_a_plan_it_cannot_honour(rules, words):
    with pytest.raises(ValueError) as info:
        Slicer(_with_head_rules(rules))
    assert all(word in str(info.value) for word in words), str(info.value)


# ----------------------------------------------------------------------------- settings that mean something

@pytest.mark.parametrize("dataset, change, words", [
    ("MNIST", dict(resnet_blocks=(2, 2, 2, 2)), ["resnet_blocks", "only to model resnet18", "not to 'conv'"]),
    ("CIFAR10", dict(num_heads=4), ["num_heads", "only to model transformer", "not to 'resnet18'"]),
    ("WikiText2", dict(sbn_samples=100), ["sbn_samples", "conv / resnet18", "not to 'transformer'"]),
    ("MNIST", dict(model="transformer"), ["'transformer' takes text data", "MNIST is image data"]),
    ("MNIST", dict(momentum=1.5), ["momentum must be in [0, 1)", "1.5"]),
    ("MNIST", dict(weight_decay=-1), ["weight_decay must be >= 0"]),
    ("MNIST", dict(clip_norm=0), ["clip_norm must be positive"]),
    ("MNIST", dict(gamma=0), ["gamma must be positive"]),
    ("MNIST", dict(seed=-1), ["seed must be an integer >= 0"]),
    ("MNIST", dict(rounds=2.5), ["rounds must be a positive integer"]),
    ("MNIST", dict(milestones=(0, 5)), ["milestones", "positive"]),
])
def test_fields_that_do_not_apply_or_are_out_of_range_are_refused(dataset, change, words):
    with pytest.raises(ConfigError) as info:
        parse_control("1_100_0.1_iid_fix_a1_bn_1_1", dataset, **change)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_text_training_rows_are_the_users():
    cfg = parse_control("1_10_0.5_iid_fix_a1-e1_bn_1_1", "WikiText2")
    assert cfg.num_users == cfg.batch_size_train == 10
    assert parse_control(cfg.control, "WikiText2") == cfg
    assert parse_control("1_7_0.5_iid_fix_a1_bn_1_1", "SOTU").batch_size_train == 7
    for bad in (lambda: parse_control(cfg.control, "WikiText2", batch_size_train=100), lambda: cfg.replace(num_users=20)):
        with pytest.raises(ConfigError, match=r"batch_size_train .* rows .* must equal num_users"):
            bad()


def test_family_defaults_pass_and_round_trip():
    for dataset in ("MNIST", "CIFAR10", "WikiText2", "SOTU"):
        cfg = parse_control("1_100_0.1_iid_fix_a1_bn_1_1", dataset)
        assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
