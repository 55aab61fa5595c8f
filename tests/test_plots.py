"""Figures and tables: they draw from tidy frames, save with their records, and picture slicing correctly."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.text

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from heterofl_core import plots  # noqa: E402
from heterofl_core.config import LEVEL_RATES  # noqa: E402
from heterofl_core import experiments as ex  # noqa: E402
from heterofl_core.experiments import (  # noqa: E402
    DataSpec, Scale, interpolation_experiments, interpolation_modes, interpolation_points)
from heterofl_core.models import build_model  # noqa: E402
from heterofl_core.slicing import Slicer  # noqa: E402


def toy_points() -> pd.DataFrame:
    """Two panels (a, b), lines to every smaller level, three seeds per mixture."""
    layout = interpolation_modes("ab", [1, 5, 9], small_ends=True)
    rows = [{"name": mode, "seed": seed, "params": ex.size_of("conv", mode)["params"],
             "final_global_accuracy": 80.0 + "edcba".index(mode[0]) + seed}
            for mode in dict.fromkeys(r["mode"] for r in layout) for seed in range(3)]
    return interpolation_points(layout, pd.DataFrame(rows), "global_accuracy")


def test_interpolation_points_are_the_mean_and_range_over_seeds() -> None:
    points = toy_points()
    row = points[(points["panel"] == "a") & (points["mix"] == "a5-e5")].iloc[0]
    assert (row["mean"], row["low"], row["high"], row["seeds"]) == (85.0, 84.0, 86.0, [0, 1, 2])
    assert row["share_big"] == 0.5 and row["line"] == "e"
    ends = points[(points["panel"] == "b") & (points["share_big"] == 0)]
    assert sorted(ends["mix"]) == ["c1", "d1", "e1"], "each line starts at its small level alone"


def test_trend_shown_compares_the_ends_beyond_their_range() -> None:
    points = toy_points()
    assert ex.trend_shown(points) == {"a": True, "b": True}
    close = points.copy()
    close.loc[(close["mix"] == "e1"), "high"] = 200.0  # e alone's best seed above a alone's worst
    assert ex.trend_shown(close) == {"a": False, "b": False}
    assert ex.trend_shown(points, lower_is_better=True) == {"a": False, "b": False}
    one_seed = points.assign(seeds=[[0]] * len(points), low=points["mean"], high=points["mean"])
    assert ex.trend_shown(one_seed) == {"a": False, "b": False}, "one seed shows no spread, so no trend"


def test_interpolation_figure_has_one_panel_per_global_level_and_one_line_per_smaller_level() -> None:
    fig = plots.interpolation_figure(toy_points(), "global_accuracy", "toy", "quick: 3 seeds",
                                     paper={"a": 99.5, "e": 77.0}, reference=(10.0, "chance"))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["global model a (rate 1)", "global model b (rate 0.5)"]
    labels = axes[0].get_legend_handles_labels()[1]
    assert labels == ["a alone", "paper", "chance", "a–b: mean, range", "a–c: mean, range", "a–d: mean, range",
                      "a–e: mean, range"], labels
    first = axes[0].containers[0].lines[0]
    assert list(first.get_ydata()) == [84.0, 85.0, 85.0, 85.0, 85.0], "b alone, a1-b9, a5-b5, a9-b1, a alone"
    shares = [t.get_text() for t in axes[0].texts][:5]
    assert shares == ["0% (b alone)", "10%", "50%", "90%", "100%"], "each point labelled with the share of big clients"
    assert "quick: 3 seeds" in fig._suptitle.get_text()


def test_figures_keep_every_text_at_least_14_points() -> None:
    """Projector-ready: no legend, tick, label or title text under 14 pt, at the size the PNG is written."""
    plots.use_style()  # as every notebook does before drawing
    history = pd.DataFrame([{"name": "a1", "round": r, "split": s, "metric": m, "value": float(r)}
                            for r in (1, 2) for s, m in (("train", "train_loss"), ("test", "global_perplexity"))])
    figures = [plots.interpolation_figure(toy_points(), "global_accuracy", "toy", "banner"),
               plots.learning_curves(history, "global_perplexity", "curves", "banner"),
               plots.table_figure(pd.DataFrame({"model": ["a"], "acc": ["1.00"]}), "T", "banner")]
    for fig in figures:
        fig.canvas.draw()
        sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip() and t.get_visible()]
        assert sizes and min(sizes) >= 14, sorted(set(sizes))
        plt.close(fig)


def test_learning_curves_and_tables_save_with_records(tmp_path: Path) -> None:
    history = pd.DataFrame([{"name": n, "round": r, "split": s, "metric": m, "value": float(r)}
                            for n in ("a1", "a5-e5") for r in (1, 2, 3)
                            for s, m in (("train", "train_loss"), ("test", "global_accuracy"))])
    fig = plots.learning_curves(history, "global_accuracy", "curves", "quick: 1 seed")
    meta = plots.record("smoke", "curves", data_source=["somewhere"], configs=[{"x": 1}], reductions=["1 round"],
                        points=[{"line": float("nan"), "mean": 1.0}])
    paths = plots.save_figure(fig, tmp_path, "curves_toy", meta)
    assert [p.suffix for p in paths] == [".png", ".pdf", ".json"] and all(p.stat().st_size > 0 for p in paths)
    record = json.loads(paths[2].read_text(), parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert record["points"] == [{"line": None, "mean": 1.0}], "a missing number is null: strict JSON"
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
    seeded = interpolation_experiments(DataSpec("MNIST", "/nowhere", 100, 10), Scale(rounds=2, num_users=10, frac=0.5),
                                       ["a", "b"], [5], other_levels=["e"], small_ends=True, seeds=[0, 1, 2])
    assert [e.name for e in seeded[:5]] == ["a1", "e1", "a5-e5", "b1", "b5-e5"], "e alone once, shared by the panels"
    assert [e.cfg.seed for e in seeded] == [0] * 5 + [1] * 5 + [2] * 5
    assert [e.cfg.control for e in grid][:2] == ["1_10_0.5_iid_fix_a1_bn_1_1", "1_10_0.5_iid_fix_a5-b5_bn_1_1"]
    assert all(e.cfg.eval_every == 1 and e.cfg.milestones == () for e in grid)
    assert len({e.key for e in grid}) == len(grid), "one run folder per experiment"
    params = [e.labels["params"] for e in grid if e.labels["other_level"] in (None, "e")]
    assert params[0] > params[1], "a alone carries more parameters than a5-e5"
