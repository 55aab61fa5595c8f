"""The benchmark's fast paths equal the plain ones, and ``heterofl bench`` reports what it promises."""

from __future__ import annotations

import json

import pytest
import torch

from heterofl_core.bench import MIXTURES, format_report, loop_split, run_benchmark
from heterofl_core.cli import build_parser, main
from heterofl_core.config import EXTRACTIONS
from heterofl_core.data import ImageData
from heterofl_core.machine import fast_layout
from heterofl_core.training import sbn_statistics
from reference import FAMILIES, LEVELS, TINY, builder, slicer_for
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)


# The aggregation's baseline is the library's plain rule: tests/test_aggregation.py checks that the
# fast path equals it bit for bit.


@pytest.mark.parametrize("family", FAMILIES)
def test_split_equals_the_loop_baseline(family):
    slicer = slicer_for(family, **TINY[family])
    state = builder(family, **TINY[family])(1.0).state_dict()
    for rate in LEVELS.values():
        got, expected = slicer.split(state, rate), loop_split(slicer, state, rate)
        assert all(torch.equal(got[key], expected[key]) for key in expected)


@pytest.mark.parametrize("family", ["conv", "resnet18"])
def test_fast_sbn_equals_plain_sbn(family):
    """BatchNorm-only train mode, channels-last, inference mode, batches of 10 inside chunks of 30
    == the whole model in train mode, contiguous, under no_grad, fed batches of 10 one by one
    (the authors' way)."""
    torch.manual_seed(0)
    plain = builder(family, track_running_stats=True, **TINY[family])(1.0)
    fast = fast_layout(builder(family, track_running_stats=True, **TINY[family])(1.0), training=False)
    fast.load_state_dict(plain.state_dict())
    shape = (1, 28, 28) if family == "conv" else (3, 32, 32)
    images = torch.randn(64, *shape)
    plain.train()
    with torch.no_grad():
        for x in images.split(10):
            plain(x)
    sbn_statistics(fast, iter(images.split(30)), 10)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, msg=lambda m: f"{key}: {m}")
    x = torch.randn(8, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain.eval()(x))


def synthetic_mnist() -> ImageData:
    gen = torch.Generator().manual_seed(0)
    return ImageData("MNIST", "synthetic", torch.randn(1000, 1, 28, 28, generator=gen), torch.arange(1000) % 10,
                     torch.randn(200, 1, 28, 28, generator=gen), torch.arange(200) % 10, 10, False)


@pytest.fixture(scope="module")
def quick_report() -> dict:
    return run_benchmark("cpu", quick=True, data=synthetic_mnist())


def test_report_holds_what_the_issue_asks_for(quick_report):
    report = json.loads(json.dumps(quick_report))  # JSON-ready
    assert {"cpu", "logical_cores", "torch_threads", "torch", "device"} <= set(report["machine"])
    for family in FAMILIES:
        result = report["families"][family]
        for key in ("aggregate_speedup_vs_plain", "aggregate_vs_memcpy", "split_speedup_vs_loop", "split_vs_memcpy"):
            assert result[key] > 0, (family, key)
        assert set(result["mixtures"]) == set(MIXTURES)
    round_ = report["round"]
    assert set(round_["phases_s"]) == {"local_training", "split", "aggregate", "sbn", "eval", "other"}
    assert round_["round_over_training"] == pytest.approx(round_["round_s"] / round_["phases_s"]["local_training"])
    assert round_["round_s"] >= sum(round_["phases_s"].values()) * 0.99
    assert round_["peak_memory"]["host_peak_mb"] > 0
    assert set(round_["flops"]) == {"local_training", "sbn", "eval"}
    levels = report["cohort"]["levels"]
    assert set(levels) == set(LEVELS)
    assert all(row["max_abs_diff"] < 1e-4 for row in levels.values()), "cohort and one-by-one training agree"
    assert set(report["targets"]) >= {"resnet18_aggregate_vs_memcpy", "transformer_aggregate_speedup_vs_plain",
                                      "round_over_training"}


def test_report_prints_every_table(quick_report):
    text = format_report(quick_report)
    for needle in ("machine:", "split and aggregate", "cohort training", "one round", "round / local training",
                   "peak memory", "targets:"):
        assert needle in text


def test_cli_registers_bench_with_help_for_every_option(capsys):
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    for action in bench._actions:
        assert action.help, action.dest
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--json" in capsys.readouterr().out
    assert main(["bench", "--repeats", "0"]) == 2


def test_report_lists_split_and_aggregate_per_extraction_strategy(quick_report):
    for family in FAMILIES:
        result = quick_report["extraction"][family]
        assert list(result["strategies"]) == list(EXTRACTIONS)
        for strategy, row in result["strategies"].items():
            assert row["split_vs_memcpy"] == pytest.approx(row["split_s"] / row["memcpy_s"])
            assert row["aggregate_vs_memcpy"] == pytest.approx(row["aggregate_s"] / row["memcpy_s"])
            assert row["aggregate_path"] == ("plain" if strategy == "random" else "fast"), (family, strategy)
    assert "extraction strategies" in format_report(quick_report)
