"""Control strings, presets and level assignment (spec sections 2 and 7)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heterofl_core.config import (LEVEL_RATES, ConfigError, ExperimentConfig, assign_fixed_levels,
                                  dirichlet_alpha, draw_dynamic_levels, labels_per_user, paper_preset, parse_control,
                                  parse_model_mode)

LEVEL_ORDER = "abcde"


@st.composite
def model_modes(draw) -> str:
    """Valid model modes: distinct levels, the first one the widest, positive integer proportions."""
    levels = draw(st.lists(st.sampled_from(LEVEL_ORDER), min_size=1, max_size=5, unique=True))
    first = min(levels)  # 'a' < 'b' < ...: the widest level
    rest = [level for level in levels if level != first]
    return "-".join(f"{level}{draw(st.integers(1, 30))}" for level in [first, *rest])


@st.composite
def control_strings(draw) -> tuple[str, str]:
    fed = draw(st.sampled_from(["0", "1"]))
    split = "none" if fed == "0" else draw(st.sampled_from(["iid", "non-iid-1", "non-iid-2", "non-iid-5", "non-iid-10"]))
    frac = f"{draw(st.integers(1, 1000)) / 1000:g}"  # written as the control string writes it
    parts = [fed, str(draw(st.integers(1, 5000))), frac, split, draw(st.sampled_from(["fix", "dynamic"])),
             draw(model_modes()), draw(st.sampled_from(["bn", "in", "ln", "gn", "none"])),
             draw(st.sampled_from(["0", "1"])), draw(st.sampled_from(["0", "1"]))]
    text_ok = split in ("iid", "none")
    dataset = draw(st.sampled_from(["MNIST", "CIFAR10", "WikiText2"] if text_ok else ["MNIST", "CIFAR10"]))
    return "_".join(parts), dataset


# ---------------------------------------------------------------- round trips

@settings(max_examples=200, deadline=None)
@given(case=control_strings())
def test_control_round_trip(case):
    control, dataset = case
    cfg = parse_control(control, dataset)
    assert cfg.control == control
    assert parse_control(cfg.control, dataset) == cfg
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_paper_example():
    cfg = parse_control("1_100_0.1_iid_fix_a2-b8_bn_1_1", "MNIST")
    assert cfg.federated and cfg.num_users == 100 and cfg.frac == 0.1 and cfg.active_users == 10
    assert cfg.data_split == "iid" and cfg.model_split == "fix"
    assert cfg.model_mode == (("a", 2), ("b", 8)) and cfg.levels == ("a", "b") and cfg.global_rate == 1.0
    assert cfg.norm == "bn" and cfg.scale and cfg.mask
    assert parse_control("1_100_0.1_iid_fix_b1-e1_bn_1_1").global_rate == 0.5
    assert parse_control("0_100_1_none_fix_a1_bn_0_0").federated is False


def test_level_rates():
    assert LEVEL_RATES == {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
    assert parse_model_mode("a1-b1-c1-d1-e1") == tuple((level, 1) for level in LEVEL_ORDER)


def test_to_dict_from_dict_round_trip_with_every_field_changed():
    cfg = ExperimentConfig(dataset="CIFAR10", model="resnet18", num_users=10, frac=0.5, data_split="non-iid-3",
                           model_split="dynamic", model_mode=(("b", 3), ("e", 1)), norm="gn", scale=False,
                           mask=False, lr=0.05, rounds=7, milestones=(2, 5), resnet_blocks=(2, 2, 2, 2),
                           mask_fill="-inf", seed=42, momentum=0.5, sbn_samples=100)
    values = json.loads(json.dumps(cfg.to_dict()))
    assert values["control"] == "1_10_0.5_non-iid-3_dynamic_b3-e1_gn_0_0"
    assert ExperimentConfig.from_dict(values) == cfg
    text = parse_control("1_10_0.5_iid_fix_a1-e1_bn_1_1", "WikiText2", dropout=0.1, bptt=32, num_heads=4)
    assert ExperimentConfig.from_dict(json.loads(json.dumps(text.to_dict()))) == text
    with pytest.raises(ConfigError, match="unknown config fields"):
        ExperimentConfig.from_dict({**values, "learning_rate": 1})


def test_config_is_frozen_and_replace_validates():
    cfg = ExperimentConfig()
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]
    assert cfg.replace(lr=0.5).lr == 0.5
    with pytest.raises(ConfigError, match="frac"):
        cfg.replace(frac=1.5)


def test_control_keeps_frac_exactly():
    cfg = ExperimentConfig(frac=1 / 3)
    assert parse_control(cfg.control).frac == cfg.frac


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("control, words", [
    ("1_100_0.1_iid_fix_a2-f8_bn_1_1", ["unknown level letter 'f'"]),
    ("1_100_0.1_iid_fix_a2-B8_bn_1_1", ["'B'", "unknown"]),
    ("1_100_0.1_iid_fix_a-b_bn_1_1", ["'a' has no proportion"]),
    ("1_100_0.1_iid_fix_a2-b_bn_1_1", ["'b' has no proportion"]),
    ("1_100_0.1_iid_fix_a0_bn_1_1", ["proportion", "'a'"]),
    ("1_100_0_iid_fix_a1_bn_1_1", ["frac", "(0, 1]"]),
    ("1_100_1.5_iid_fix_a1_bn_1_1", ["frac", "1.5"]),
    ("1_100_-0.1_iid_fix_a1_bn_1_1", ["frac"]),
    ("1_100_x_iid_fix_a1_bn_1_1", ["frac", "'x'"]),
    ("1_100_0.1_non-iid-0_fix_a1_bn_1_1", ["non-iid-0", "N >= 1"]),
    ("1_100_0.1_non-iid_fix_a1_bn_1_1", ["unknown data split 'non-iid'"]),
    ("1_100_0.1_noniid-2_fix_a1_bn_1_1", ["unknown data split", "dirALPHA"]),
    ("1_100_0.1_dir0_fix_a1_bn_1_1", ["'dir0'", "ALPHA > 0", "dir0.3"]),
    ("1_100_0.1_dirx_fix_a1_bn_1_1", ["'dirx'", "ALPHA > 0"]),
    ("1_100_0.1_dir-1_fix_a1_bn_1_1", ["'dir-1'", "ALPHA > 0"]),
    ("1_100_0.1_none_fix_a1_bn_1_1", ["'none'", "fed=0"]),
    ("0_100_0.1_iid_fix_a1_bn_1_1", ["fed=0", "'iid'"]),
    ("1_100_0.1_iid_fix_a1_batch_1_1", ["unknown norm 'batch'"]),
    ("1_100_0.1_iid_fix_a1_bn_1", ["8 parts", "expected 9"]),
    ("1_100_0.1_iid_fix_a1_bn_1_1_1", ["10 parts", "expected 9"]),
    ("1_100_0.1_iid_a1_bn_1_1", ["8 parts"]),
    ("1_100_0.1_iid_fix_a1_bn_2_1", ["scale='2'", "0 or 1"]),
    ("1_100_0.1_iid_fix_a1_bn_1_yes", ["mask='yes'", "0 or 1"]),
    ("2_100_0.1_iid_fix_a1_bn_1_1", ["fed='2'", "0 or 1"]),
    ("1_100_0.1_iid_fix_b1-a1_bn_1_1", ["first level (b)", "['a']", "wider"]),
    ("1_100_0.1_iid_fix_c2-e1-b1_bn_1_1", ["first level (c)", "['b']"]),
    ("1_100_0.1_iid_fix_a1-a2_bn_1_1", ["once"]),
    ("1_100_0.1_iid_random_a1_bn_1_1", ["unknown model split 'random'"]),
    ("1_0_0.1_iid_fix_a1_bn_1_1", ["num_users", "0"]),
    ("1_ten_0.1_iid_fix_a1_bn_1_1", ["num_users='ten'", "integer"]),
])
def test_bad_control_strings_are_refused_with_the_bad_part_named(control, words):
    with pytest.raises(ConfigError) as info:
        parse_control(control, "MNIST")
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_text_corpus_is_iid_only():
    with pytest.raises(ConfigError, match="only the iid split"):
        parse_control("1_100_0.1_non-iid-2_fix_a1_bn_1_1", "WikiText2")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    for bad in (dict(norm="bn2"), dict(model="vgg"), dict(mask_fill="nan"), dict(model_mode=(("z", 1),)),
                dict(model_mode=()), dict(resnet_blocks=(1, 1, 1)), dict(milestones=(5, 2)), dict(embedding_size=100),
                dict(sbn_samples=-1), dict(sbn_batch_size=-10)):
        with pytest.raises(ConfigError):
            ExperimentConfig(**bad)


def test_a_dirichlet_split_in_the_control_string():
    cfg = parse_control("1_100_0.1_dir0.3_fix_a1-e1_bn_1_1", "MNIST")
    assert cfg.data_split == "dir0.3" and cfg.control == "1_100_0.1_dir0.3_fix_a1-e1_bn_1_1"
    assert dirichlet_alpha(cfg.data_split) == 0.3 and dirichlet_alpha("dir1e-2") == 0.01
    assert dirichlet_alpha("iid") is None and dirichlet_alpha("non-iid-2") is None and dirichlet_alpha("dirnan") is None
    with pytest.raises(ConfigError, match="supports only the iid split"):
        parse_control("1_100_0.1_dir0.3_fix_a1_none_1_1", "WikiText2")


# ---------------------------------------------------------------- presets (spec section 7)

@pytest.mark.parametrize("dataset, split, expected", [
    ("MNIST", "iid", dict(model="conv", lr=0.01, rounds=200, local_epochs=5, batch_size_train=10,
                          batch_size_test=50, milestones=(100,))),
    ("MNIST", "non-iid-2", dict(model="conv", lr=0.01, rounds=400, local_epochs=5, batch_size_train=10,
                                batch_size_test=50, milestones=(200,))),
    ("CIFAR10", "iid", dict(model="resnet18", lr=0.1, rounds=400, local_epochs=5, batch_size_train=10,
                            batch_size_test=50, milestones=(150, 250))),
    ("CIFAR10", "non-iid-2", dict(model="resnet18", lr=0.1, rounds=800, local_epochs=5, batch_size_train=10,
                                  batch_size_test=50, milestones=(300, 500))),
    ("MNIST", "dir0.3", dict(model="conv", lr=0.01, rounds=400, local_epochs=5, batch_size_train=10,
                             batch_size_test=50, milestones=(200,))),  # label skew: the non-iid settings
    ("WikiText2", "iid", dict(model="transformer", lr=0.1, rounds=200, local_epochs=1, batch_size_train=100,
                              batch_size_test=10, milestones=(50, 100))),
])
def test_paper_presets(dataset, split, expected):
    cfg = parse_control(f"1_100_0.1_{split}_fix_a1_bn_1_1", dataset)
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name
    assert paper_preset(dataset, split) == expected
    # shared by all runs
    assert (cfg.momentum, cfg.weight_decay, cfg.clip_norm, cfg.gamma) == (0.9, 5e-4, 1.0, 0.1)
    assert cfg.num_users == 100 and cfg.active_users == 10 and cfg.dataset == dataset
    assert labels_per_user(split) == (2 if split == "non-iid-2" else None)


def test_transformer_defaults():
    cfg = parse_control("1_100_0.1_iid_fix_a1_bn_1_1", "WikiText2")
    assert (cfg.embedding_size, cfg.num_heads, cfg.hidden_size, cfg.num_layers, cfg.dropout, cfg.bptt) == \
        (256, 8, 512, 4, 0.2, 64)
    assert cfg.token_mask_rate == 0.15 and cfg.resnet_blocks == (1, 1, 1, 2) and cfg.mask_fill == "zero"


def test_overrides():
    cfg = parse_control("1_100_0.1_non-iid-2_fix_a1-e1_bn_1_1", "CIFAR10", lr=0.05, rounds=3,
                        resnet_blocks=(2, 2, 2, 2), mask_fill="-inf", norm="gn")
    assert (cfg.lr, cfg.rounds, cfg.resnet_blocks, cfg.mask_fill, cfg.norm) == (0.05, 3, (2, 2, 2, 2), "-inf", "gn")
    assert cfg.milestones == (300, 500)  # the rest of the preset stays
    assert cfg.control == "1_100_0.1_non-iid-2_fix_a1-e1_gn_1_1"
    with pytest.raises(ConfigError, match="lr"):
        parse_control("1_100_0.1_iid_fix_a1_bn_1_1", "MNIST", lr=0)


def test_active_users():
    assert ExperimentConfig(num_users=100, frac=0.1).active_users == 10
    assert ExperimentConfig(num_users=10, frac=0.25).active_users == 3
    assert ExperimentConfig(num_users=3, frac=0.01).active_users == 1
    assert ExperimentConfig(num_users=7, frac=1.0).active_users == 7


# ---------------------------------------------------------------- level assignment

def test_fixed_levels_paper_example():
    levels = assign_fixed_levels((("a", 2), ("b", 8)), 100)
    assert levels == ["a"] * 20 + ["b"] * 80
    assert assign_fixed_levels((("a", 1), ("b", 1), ("c", 1)), 10) == ["a"] * 3 + ["b"] * 3 + ["c"] * 4
    assert assign_fixed_levels((("a", 5), ("e", 5)), 3) == ["e"] * 3  # fewer users than the proportions' sum


@settings(max_examples=150, deadline=None)
@given(mode=model_modes(), num_users=st.integers(1, 1000))
def test_fixed_levels_rule(mode, num_users):
    model_mode = parse_model_mode(mode)
    levels = assign_fixed_levels(model_mode, num_users)
    assert len(levels) == num_users
    unit = num_users // sum(share for _, share in model_mode)
    counts = Counter(levels)
    for i, (level, share) in enumerate(model_mode):
        expected = unit * share + (num_users - unit * sum(s for _, s in model_mode) if i == len(model_mode) - 1 else 0)
        assert counts[level] == expected, (level, counts)
    # laid out in order: each level in one contiguous run, in the mode's order
    runs = [level for i, level in enumerate(levels) if i == 0 or levels[i - 1] != level]
    assert runs == [level for level, _ in model_mode if counts[level] > 0]


def test_dynamic_levels_reproducible_and_proportional():
    mode = (("a", 1), ("b", 3), ("e", 6))
    first = draw_dynamic_levels(mode, 100, torch.Generator().manual_seed(5))
    assert first == draw_dynamic_levels(mode, 100, torch.Generator().manual_seed(5))
    assert first != draw_dynamic_levels(mode, 100, torch.Generator().manual_seed(6))
    assert set(first) <= {"a", "b", "e"} and len(first) == 100
    counts = Counter(draw_dynamic_levels(mode, 20000, torch.Generator().manual_seed(7)))
    for level, share in mode:
        expected = 20000 * share / 10
        assert abs(counts[level] - expected) < 5 * math.sqrt(expected), (level, counts)


def test_dynamic_levels_each_round_differs():
    gen = torch.Generator().manual_seed(0)
    rounds = [draw_dynamic_levels((("a", 1), ("b", 1)), 50, gen) for _ in range(3)]
    assert rounds[0] != rounds[1] != rounds[2]
