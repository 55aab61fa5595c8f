"""Figures and tables: they draw from tidy frames, save with their records, and picture slicing correctly."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.collections
import matplotlib.text

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from heterofl_core import plots, profiles  # noqa: E402
from heterofl_core.data import resolve_data_root  # noqa: E402
from heterofl_core.config import LEVEL_RATES  # noqa: E402
from heterofl_core import experiments as ex  # noqa: E402
from heterofl_core.experiments import (  # noqa: E402
    DataSpec, Scale, interpolation_experiments, interpolation_modes, interpolation_points)
from heterofl_core.families import build_model  # noqa: E402
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
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    lines = [f"mixtures x{{i}}-{y}{{10-i}}: mean, bar: range over seeds" for y in "bcde"]
    assert labels == ["x alone: every user at the panel's level x", *lines, "dotted: joins measured points only",
                      "e alone (the same runs in every panel)", "paper"], "chance, off the axis, is an edge note only"
    first = axes[0].containers[0].lines[0]
    assert list(first.get_ydata()) == [84.0, 85.0, 85.0, 85.0], "b alone, a1-b9, a5-b5, a9-b1: markers of line a-b"
    assert first.get_linestyle() == "None", "measured points are markers, not a line"
    assert "quick: 3 seeds" in fig._suptitle.get_text()
    plt.close(fig)


def test_interpolation_figure_draws_only_what_was_measured() -> None:
    """Markers with their seed range; a dotted connector through exactly the measured points; no band."""
    points = toy_points()
    fig = plots.interpolation_figure(points, "global_accuracy", "toy")
    ax = fig.axes[0]
    assert not [c for c in ax.collections if isinstance(c, matplotlib.collections.PolyCollection)], "no band"
    dotted = [line for line in ax.lines if line.get_linestyle() == ":"]
    panel = points[points["panel"] == "a"]
    for y, connector in zip("bcde", dotted):
        line = pd.concat([panel[panel["line"] == y], panel[panel["line"].isna()]]).sort_values("mean_size")
        assert list(connector.get_xdata()) == list(line["mean_size"]), f"a-{y} joins its measured points only"
    assert len(dotted) == 4
    solid = [line for line in ax.lines if line.get_linestyle() == "-" and len(line.get_xdata()) > 1
             and line.get_xdata()[0] != line.get_xdata()[-1]]
    assert not solid, "no solid line joins measured points"
    plt.close(fig)


def test_smallest_level_alone_is_one_shared_reference_in_every_panel() -> None:
    points = toy_points()
    e_alone = points[points["mix"] == "e1"].iloc[0]
    fig = plots.interpolation_figure(points, "global_accuracy", "toy")
    for ax in [ax for ax in fig.axes if ax.get_visible()]:
        squares = [c.lines[0] for c in ax.containers if c.lines[0].get_marker() == "s"]
        assert [(list(s.get_xdata()), list(s.get_ydata())) for s in squares] == [([e_alone["mean_size"]],
                                                                                   [e_alone["mean"]])]
        dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert [list(line.get_ydata()) for line in dashed] == [[e_alone["mean"]] * 2], "across the panel"
        circles = {x for c in ax.containers if c.lines[0].get_marker() == "o" for x in c.lines[0].get_xdata()}
        assert e_alone["mean_size"] not in circles, "e alone is not drawn as the start of a panel's own line"
    others = points[(points["panel"] == "a") & (points["share_big"] == 0) & (points["line"] != "e")]
    circles = {x for c in fig.axes[0].containers if c.lines[0].get_marker() == "o" for x in c.lines[0].get_xdata()}
    assert set(others["mean_size"]) <= circles, "b, c, d alone stay markers of their lines"
    plt.close(fig)


def test_panels_share_one_value_axis_and_far_references_do_not_stretch_it() -> None:
    points = toy_points()  # 80..86 over the seeds
    fig = plots.interpolation_figure(points, "global_accuracy", "toy", paper={"a": 99.5, "b": 87.5},
                                     reference=(10.0, "chance"))
    a, b = fig.axes[0], fig.axes[1]
    assert a.get_ylim() == b.get_ylim() and a.get_shared_y_axes().joined(a, b)
    low, high = a.get_ylim()
    assert 75 < low < points["low"].min() and points["high"].max() < high < 95, (low, high)
    notes = [t.get_text() for t in a.texts]
    assert "paper 99.5 ↑" in notes and "chance 10 ↓" in notes, notes
    diamonds = [line for line in b.lines if line.get_marker() == "D"]
    assert [list(d.get_ydata()) for d in diamonds] == [[87.5]], "a paper value near the data is a diamond"
    plt.close(fig)
    near = plots.interpolation_figure(points, "global_accuracy", "toy", paper={"a": 88.0})
    assert near.axes[0].get_ylim()[1] > 88.0 and not near.axes[0].texts, "a value near the data joins the axis"
    plt.close(near)


def test_perplexity_keeps_its_log_axis_with_a_shared_range() -> None:
    toy = toy_points()
    points = toy.assign(mean=1000 - 10 * toy["mean"], low=1000 - 10 * toy["high"], high=1000 - 10 * toy["low"])
    fig = plots.interpolation_figure(points, "global_perplexity", "toy", reference=(220.0, "unigram"))
    assert fig.axes[0].get_yscale() == "log" and fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    assert [line.get_ydata()[0] for line in fig.axes[0].lines if line.get_linestyle() == "-."] == [220.0]
    plt.close(fig)


def test_shares_are_ticked_on_a_top_axis_where_measured() -> None:
    fig = plots.interpolation_figure(toy_points(), "global_accuracy", "toy")
    top = fig.axes[0].child_axes[0]
    fig.canvas.draw()
    assert [t.get_text() for t in top.get_xticklabels()] == ["0%", "10%", "50%", "90%", "100%"]
    assert top.get_xlabel() == "share of users at level a (line a–e)"
    plt.close(fig)


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


def test_footprint_places_a_clients_own_tensor_where_it_sits() -> None:
    slicer = Slicer(partial(build_model, "transformer", vocab_size=20), 1.0)
    name = "layers.0.attention.q.weight"  # per-head prefixes: 8 heads of 32 rows
    client = torch.randn(slicer.slices(0.25)[name].local_shape)
    mark = plots.footprint(slicer, name, 0.25, value=client)
    held = slicer.holdings(0.25)[name].index
    assert np.array_equal(mark[np.ix_(held[0].numpy(), held[1].numpy())], client.numpy())
    assert np.isnan(mark).sum() == mark.size - client.numel()


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


def test_a_panel_can_run_its_own_points() -> None:
    modes = interpolation_modes("ab", [5], ["e"], small_ends=True, panel_points={"a": [1, 3, 5, 7, 9]})
    assert [m["mode"] for m in modes] == ["a1", "e1", "a1-e9", "a3-e7", "a5-e5", "a7-e3", "a9-e1", "b1", "e1", "b5-e5"]
    assert interpolation_modes("b", [5], panel_points={"a": [1]}) == interpolation_modes("b", [5]), "a is not drawn"
    with pytest.raises(ValueError, match="panel_points"):
        interpolation_modes("a", [5], panel_points={"e": [1]})
    with pytest.raises(ValueError, match="1..9"):
        interpolation_modes("a", [5], panel_points={"a": [10]})
    grid = interpolation_experiments(DataSpec("MNIST", "/nowhere", 100, 10), Scale(rounds=2, num_users=10, frac=0.5),
                                     ["a", "b"], [5], other_levels=["e"], small_ends=True,
                                     panel_points={"a": [1, 9]})
    assert [e.name for e in grid] == ["a1", "e1", "a1-e9", "a9-e1", "b1", "b5-e5"]


def test_quick_mnist_measures_five_of_the_papers_mixtures_on_one_line() -> None:
    """Acceptance: at quick, notebook 06 runs at least one panel at i = 1, 3, 5, 7, 9 (the paper: 1..9); the
    other panels keep i = 5, so the profile adds 4 mixtures (x 3 seeds) and no more."""
    settings = profiles.settings("quick", "06_mnist_cnn")
    layout = interpolation_modes(settings.global_levels, settings.points, settings.get("other_levels"),
                                 small_ends=True, panel_points=settings.get("panel_points"))
    inner = {x: {row["i"] / 10 for row in layout if row["global_level"] == x and 0 < row["i"] / 10 < 1}
             for x in settings.global_levels}
    assert max(len(shares) for shares in inner.values()) >= 5, inner
    assert sorted(len(shares) for shares in inner.values()) == [1, 1, 1, 5], inner
    paper = profiles.settings("paper", "06_mnist_cnn")
    full = interpolation_modes(paper.global_levels, paper.points, paper.get("other_levels"), small_ends=True,
                               panel_points=paper.get("panel_points"))
    assert all(sum(1 for row in full if row["global_level"] == x and row["other_level"] == "e" and 0 < row["i"] < 10)
               == 9 for x in paper.global_levels), "at paper every panel has all nine"


@pytest.mark.skipif(not (resolve_data_root() / "MNIST").is_dir(), reason="needs the MNIST files")
def test_interpolation_study_reads_a_panels_own_points(tmp_path: Path) -> None:
    study = ex.InterpolationStudy("MNIST", profiles.settings("quick", "06_mnist_cnn"),
                                  (resolve_data_root(), tmp_path / "runs", tmp_path / "figures"))
    dense = {row["mode"] for row in study.layout if row["global_level"] == "a" and 0 < row["i"] < 10}
    assert dense == {"a1-e9", "a3-e7", "a5-e5", "a7-e3", "a9-e1"}
    assert len({e.name for e in study.grid}) == 13 and len(study.grid) == 13 * 3, "9 + 4 mixtures, 3 seeds each"
