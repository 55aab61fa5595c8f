"""Figures and tables: they draw from tidy frames, save with their records, and picture slicing correctly."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from heterofl_core import plots  # noqa: E402
from heterofl_core.config import LEVEL_RATES  # noqa: E402
from heterofl_core.experiments import interpolation_experiments, interpolation_modes, DataSpec, Scale  # noqa: E402
from heterofl_core.models import build_model  # noqa: E402
from heterofl_core.slicing import Slicer  # noqa: E402


def toy_summary() -> pd.DataFrame:
    rows = []
    for x in "ab":
        rows.append({"global_level": x, "other_level": None, "i": 10, "params": 100.0 if x == "a" else 25.0,
                     "final_global_accuracy": 90.0})
        for y in "bcde"[("ab".index(x)):]:
            for i in (1, 5, 9):
                rows.append({"global_level": x, "other_level": y, "i": i, "params": 10.0 * i,
                             "final_global_accuracy": 80 + i})
    return pd.DataFrame(rows)


def test_interpolation_figure_has_one_panel_per_global_level_and_one_line_per_smaller_level() -> None:
    fig = plots.interpolation_figure(toy_summary(), "global_accuracy", "toy", ["a note"])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["global model a (rate 1)", "global model b (rate 0.5)"]
    labels = [line.get_label() for line in axes[0].get_lines()]
    assert labels == ["a–b", "a–c", "a–d", "a–e", "a alone"]
    first = axes[0].get_lines()[0]
    assert list(first.get_xdata()) == [10.0, 50.0, 90.0, 100.0], "each line ends at x alone"


def test_learning_curves_and_tables_save_with_records(tmp_path: Path) -> None:
    history = pd.DataFrame([{"name": n, "round": r, "split": s, "metric": m, "value": float(r)}
                            for n in ("a1", "a5-e5") for r in (1, 2, 3)
                            for s, m in (("train", "train_loss"), ("test", "global_accuracy"))])
    fig = plots.learning_curves(history, "global_accuracy", "curves", "note")
    meta = plots.record("smoke", "curves", data_source=["somewhere"], configs=[{"x": 1}], reductions=["1 round"])
    paths = plots.save_figure(fig, tmp_path, "curves_toy", meta)
    assert [p.suffix for p in paths] == [".png", ".pdf", ".json"] and all(p.stat().st_size > 0 for p in paths)
    record = json.loads(paths[2].read_text())
    assert record["profile"] == "smoke" and record["code_version"] and record["date"] and record["configs"]

    table = pd.DataFrame({"model": ["a", "e"], "acc": ["91.00", "77.00"]})
    paths = plots.save_table(table, tmp_path, "table_toy", plots.record("quick", "T", data_source="none"), "n")
    assert sorted(p.suffix for p in paths) == [".csv", ".json", ".md", ".pdf", ".png"]
    assert "| a     | 91.00 |" in (tmp_path / "table_toy.md").read_text()
    assert pd.read_csv(tmp_path / "table_toy.csv")["model"].tolist() == ["a", "e"]


def test_entry_levels_pictures_nested_prefixes_and_heads() -> None:
    conv = Slicer(partial(build_model, "conv"), 1.0)
    owner = plots.entry_levels(conv, "features.5.weight", list(LEVEL_RATES))  # (128, 64)
    assert owner.shape == (128, 64)
    assert owner[0, 0] == 4 and owner[8, 4] == 3 and owner[127, 63] == 0  # e corner, d ring, a outside
    head = plots.entry_levels(conv, "head.weight", ["a", "e"])
    assert (head[:, :32] == 1).all() and (head[:, 32:] == 0).all(), "every class row, a prefix of columns"
    transformer = Slicer(partial(build_model, "transformer", vocab_size=50), 1.0)
    q = plots.entry_levels(transformer, "layers.0.attention.q.weight", ["a", "b"])  # 8 heads of 32 rows
    rows = q[:, 0]
    assert all((rows[h * 32:h * 32 + 16] == 1).all() and (rows[h * 32 + 16:(h + 1) * 32] == 0).all()
               for h in range(8)), "per-head prefix: the first half of every head"


def test_footprint_keeps_only_a_clients_label_rows() -> None:
    slicer = Slicer(partial(build_model, "conv", hidden=(8, 8, 8, 8)), 1.0)
    mark = plots.footprint(slicer, "head.weight", 0.5, labels=[2, 3], value=7.0)
    held = ~np.isnan(mark)
    assert held.sum() == 2 * 4 and held[2:4, :4].all() and (mark[held] == 7).all()


def test_mixture_view_draws_entries_and_sizes() -> None:
    fig, table = plots.mixture_view("conv", {"a": 2, "d": 8}, "features.5.weight")
    assert table["model"].tolist() == ["a", "d", "a2-d8"] and float(table["ratio"].iloc[-1]) < 0.3
    with pytest.raises(ValueError, match="at least one level"):
        plots.mixture_view("conv", {})


def test_interpolation_grid_matches_the_spec() -> None:
    modes = interpolation_modes("abcd", range(1, 10))
    assert len(modes) == (4 * 9 + 1) + (3 * 9 + 1) + (2 * 9 + 1) + (9 + 1)
    assert {m["mode"] for m in modes if m["global_level"] == "a"} >= {"a1", "a1-e9", "a9-b1"}
    with pytest.raises(ValueError):
        interpolation_modes(["e"], [5])
    grid = interpolation_experiments(DataSpec("MNIST", "/nowhere", 100, 10), Scale(rounds=2, num_users=10, frac=0.5),
                                     ["a"], [5], curve_points=[5], curve_eval_every=1)
    assert [e.cfg.control for e in grid][:2] == ["1_10_0.5_iid_fix_a1_bn_1_1", "1_10_0.5_iid_fix_a5-b5_bn_1_1"]
    assert all(e.cfg.eval_every == 1 and e.cfg.milestones == () for e in grid)
    assert len({e.key for e in grid}) == len(grid), "one run folder per experiment"
    params = [e.labels["params"] for e in grid if e.labels["other_level"] in (None, "e")]
    assert params[0] > params[1], "a alone carries more parameters than a5-e5"
