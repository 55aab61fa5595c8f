"""Sizes: the paper's CIFAR10 columns to the digits shown, the authors' FLOP rules by hand, mixtures, modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from heterofl_core.config import LEVEL_RATES, parse_model_mode
from heterofl_core.families import build_model
from heterofl_core.sizes import (
    ModelSize,
    count_flops_authors,
    count_flops_standard,
    count_params,
    format_table,
    human,
    level_size,
    megabytes,
    mixture_sizes,
)

LEVELS = tuple(LEVEL_RATES)

# Paper, CIFAR10 table (spec section 8): model -> (ratio, params, FLOPs, MB), ResNet18 [1, 1, 1, 2].
PAPER_CIFAR10 = {
    "a": ("1.00", "9.6M", "330.2M", "36.71"),
    "b": ("1.00", "2.4M", "83.3M", "9.19"),
    "c": ("1.00", "604K", "21.2M", "2.30"),
    "d": ("1.00", "152K", "5.5M", "0.58"),
    "e": ("1.00", "38K", "1.5M", "0.15"),
    "a-e": ("0.50", "4.8M", "165.9M", "18.43"),
    "a-b-c-d-e": ("0.27", "2.6M", "88.4M", "9.78"),
    "b-e": ("0.51", "1.2M", "42.4M", "4.67"),
    "b-c-d-e": ("0.33", "801K", "27.9M", "3.05"),
    "c-e": ("0.53", "321K", "11.3M", "1.22"),
    "c-d-e": ("0.44", "265K", "9.4M", "1.01"),
    "d-e": ("0.63", "95K", "3.5M", "0.36"),
}


def paper_digits(row: ModelSize) -> tuple[str, str, str, str]:
    """A row as the paper prints it: ratio 2 decimals, params M/1 decimal or K/0, FLOPs M/1, MB 2 decimals."""
    return f"{row.ratio:.2f}", human(row.params), human(row.flops), f"{row.mb:.2f}"


# ----------------------------------------------------------------------------- the paper's numbers

@pytest.mark.parametrize("level", LEVELS)
def test_paper_cifar10_levels(level: str) -> None:
    assert paper_digits(level_size("resnet18", level)) == PAPER_CIFAR10[level]


@pytest.mark.parametrize("mode", ["a-e", "a-b-c-d-e", "a1-b1-c1-d1-e1", "b-e", "b-c-d-e", "c-e", "c-d-e", "d-e"])
def test_paper_cifar10_mixtures(mode: str) -> None:
    mixture = mixture_sizes("resnet18", mode)[-1]
    name = "a-b-c-d-e" if mode.startswith("a1") else mode
    assert mixture.model_mode == name
    assert paper_digits(mixture) == PAPER_CIFAR10[name]


def test_paper_exact_counts_and_blocks_option() -> None:
    a = level_size("resnet18", "a")
    assert (a.params, a.flops) == (9_622_090, 330_246_144)
    assert a.mb == pytest.approx(9_622_090 * 4 / 2**20)


def test_megabytes_is_four_bytes_per_parameter_over_two_to_the_twenty() -> None:
    assert megabytes(2**18) == 1.0 and megabytes(0) == 0.0
    assert f"{megabytes(9_622_090):.2f}" == "36.71", "the paper's MB of level a"
    assert all(level_size("resnet18", level).mb == megabytes(level_size("resnet18", level).params) for level in LEVELS)
    assert human(level_size("resnet18", "a", resnet_blocks=(2, 2, 2, 2)).params) == "11.2M"  # authors' later code: 11.17M


# ----------------------------------------------------------------------------- counters on hand-computable modules

def test_count_params_is_every_weight_and_bias() -> None:
    for name, options in [("conv", {}), ("resnet18", {}), ("transformer", {"vocab_size": 50})]:
        for rate in (1.0, 0.0625):
            model = build_model(name, rate, **options)
            assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_count_params_ignores_other_parameter_names() -> None:
    model = nn.Linear(4, 5)
    model.extra = nn.Parameter(torch.zeros(7))
    assert count_params(model) == 4 * 5 + 5


@pytest.mark.parametrize("module, sample, expected", [
    # Conv2d(2 -> 3, 3x3, pad 1) on 5x5: 9*2*3*25 = 1350 (+ bias 3*25 = 75), x2 tensors with bias
    (nn.Conv2d(2, 3, 3, padding=1), torch.zeros(1, 2, 5, 5), (1350 + 75) * 2),
    (nn.Conv2d(2, 3, 3, padding=1, bias=False), torch.zeros(1, 2, 5, 5), 1350),
    # stride 2, groups 2 on 8x8 -> 3x3 out: 3*3*4*(6/2)*9 = 972 (the authors' rule uses C_in, not C_in/groups)
    (nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False), torch.zeros(1, 4, 8, 8), 972),
    # Linear(4 -> 5) with bias on (3, 4): 3 rows * 4 * 5 = 60, no bias term, x2 tensors
    (nn.Linear(4, 5), torch.zeros(3, 4), 60 * 2),
    (nn.Linear(4, 5), torch.zeros(2, 3, 4), 6 * 4 * 5 * 2),  # every leading index is a row
    (nn.Linear(4, 5, bias=False), torch.zeros(3, 4), 60),
    # BatchNorm2d(3) on (2, 3, 4, 4): 96 elements, doubled (affine) = 192, x2 tensors
    (nn.BatchNorm2d(3, track_running_stats=False), torch.zeros(2, 3, 4, 4), 96 * 2 * 2),
    (nn.BatchNorm2d(3), torch.zeros(2, 3, 4, 4), 96 * 2 * 2),  # buffers are not parameter tensors
    (nn.BatchNorm2d(3, affine=False), torch.zeros(2, 3, 4, 4), 0),  # no parameters: not counted
    (nn.InstanceNorm2d(3, affine=True), torch.zeros(2, 3, 4, 4), 96 * 2 * 2),
    # LayerNorm(4) on (3, 4): 12 elements, doubled = 24, x2 tensors
    (nn.LayerNorm(4), torch.zeros(3, 4), 12 * 2 * 2),
    (nn.Embedding(10, 4), torch.tensor([1, 2, 3]), 0),
    (nn.GroupNorm(2, 4), torch.zeros(2, 4, 3, 3), 0),
    (nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2, bias=False)), torch.zeros(3, 4), 120 + 3 * 5 * 2),
])
def test_authors_flop_rules(module: nn.Module, sample: torch.Tensor, expected: int) -> None:
    assert count_flops_authors(module, sample) == expected


def test_authors_flops_count_every_call_and_restore_the_model() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    assert count_flops_authors(model, torch.zeros(1, 4)) == 2 * (4 * 4 * 2)
    assert not model.training
    assert not shared._forward_hooks


def test_standard_flops_are_torch_counts() -> None:
    assert count_flops_standard(nn.Linear(4, 5), torch.zeros(3, 4)) == 2 * 3 * 4 * 5  # multiply-add = 2
    assert count_flops_standard(nn.Conv2d(2, 3, 3, padding=1, bias=False), torch.zeros(1, 2, 5, 5)) == 2 * 1350
    # attention is counted (the fused CPU kernel alone would count 0)
    with_attention = level_size("transformer", "e", vocab_size=100).flops_standard
    assert with_attention > count_flops_standard(nn.Linear(16, 100), torch.zeros(64, 16))


@pytest.mark.parametrize("name", ["conv", "resnet18", "transformer"])
def test_standard_flops_positive_and_labelled(name: str) -> None:
    rows = mixture_sizes(name, "a-e", vocab_size=100)
    assert all(row.flops_standard > 0 for row in rows)
    table = format_table(rows)
    assert "FLOPs (standard)" in table and "FLOPs (authors)" in table
    assert "not the paper's" in table


# ----------------------------------------------------------------------------- levels and mixtures

@pytest.mark.parametrize("name", ["conv", "resnet18", "transformer"])
def test_sizes_shrink_with_rate(name: str) -> None:
    rows = [level_size(name, level, vocab_size=1000) for level in LEVELS]
    for wide, narrow in zip(rows, rows[1:]):
        assert wide.params > narrow.params and wide.flops > narrow.flops
        assert wide.mb > narrow.mb and wide.flops_standard > narrow.flops_standard


def test_transformer_vocabulary_rows() -> None:
    """Embedding has vocab + 1 rows (mask token), the output layer vocab rows: one word adds 2e + 1 entries."""
    small, large = (level_size("transformer", "e", vocab_size=v) for v in (100, 101))
    e = 16  # 256 * 0.0625
    assert large.params - small.params == 2 * e + 1
    assert large.flops - small.flops == 64 * e * 2  # one more output row, 64 tokens, weight and bias


def test_mixture_is_the_weighted_mean() -> None:
    a, b, mixture = mixture_sizes("conv", "a2-b8")
    assert (a.model_mode, b.model_mode, mixture.model_mode) == ("a", "b", "a2-b8")
    assert a.ratio == b.ratio == 1.0  # each level as a model of its own, as in the paper's table
    assert mixture.params == round(0.2 * a.params + 0.8 * b.params)
    assert mixture.flops == round(0.2 * a.flops + 0.8 * b.flops)
    assert mixture.flops_standard == round(0.2 * a.flops_standard + 0.8 * b.flops_standard)
    assert mixture.mb == pytest.approx(0.2 * a.mb + 0.8 * b.mb)
    assert mixture.ratio == pytest.approx((0.2 * a.params + 0.8 * b.params) / a.params)


def test_mode_spellings_agree_and_global_is_the_first_level() -> None:
    assert mixture_sizes("conv", "a-b-c") == mixture_sizes("conv", "a1-b1-c1")
    assert parse_model_mode("a2-b", shorthand=True) == (("a", 2), ("b", 1))
    rows = mixture_sizes("conv", "b-e")  # global model b: the mixture's ratio is against b
    assert rows[-1].ratio == pytest.approx((rows[0].params + rows[1].params) / 2 / rows[0].params)
    assert [r.model_mode for r in rows] == ["b", "e", "b-e"]
    assert mixture_sizes("conv", "a") == [level_size("conv", "a")]


@pytest.mark.parametrize("mode, bad", [("a-f", "'f'"), ("a-bb", "'bb'"), ("x1", "'x1'"), ("a0-b1", "'a0'"),
                                       ("", "''"), ("a-b-a", "once"), ("b-a", "widest")])
def test_bad_mode_refused(mode: str, bad: str) -> None:
    with pytest.raises(ValueError, match=bad) as info:
        mixture_sizes("conv", mode)
    if "'" in bad:
        assert "valid levels: a=1, b=0.5" in str(info.value)


def test_unknown_model_and_level_refused() -> None:
    with pytest.raises(ValueError, match="unknown model 'mlp'"):
        level_size("mlp", "a")
    with pytest.raises(ValueError, match="unknown level 'z'.*valid levels"):
        level_size("conv", "z")


# ----------------------------------------------------------------------------- table

def test_human_units() -> None:
    assert [human(n) for n in (38, 999, 38_350, 603_802, 999_999, 9_622_090, 330_246_144, 1_367_932_928)] == \
        ["38", "999", "38K", "604K", "1.0M", "9.6M", "330.2M", "1.4G"]


def test_format_table_is_aligned_with_exact_numbers() -> None:
    table = format_table(mixture_sizes("resnet18", "a-b-c-d-e"))
    lines = table.splitlines()
    assert lines[0].split("  ")[0].strip() == "model"
    assert len({len(line) for line in lines[:8]}) == 1  # header, rule, 5 levels, mixture
    assert "9.6M (9,622,090)" in table and "330.2M (330,246,144)" in table and "36.71" in table
    assert lines[7].startswith("a-b-c-d-e") and " 0.27 " in lines[7]
