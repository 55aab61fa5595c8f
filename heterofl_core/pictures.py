"""Pictures to project in a workshop, drawn from the library so they stay true.

- :func:`round_diagram`: one round as a flow (plan, split, local training, count aggregation, sBN,
  evaluation), with what travels on each arrow and how big it is, for a given model and mixture (the
  sizes come from :mod:`heterofl_core.sizes`, the counts from the config);
- :func:`nested_submodels`: which entries of the MNIST CNN each level holds, with each level's size;
- :func:`cheat_sheet`: one page: levels and rates, the control string field by field, fix and dynamic,
  Global and Local accuracy with their chance levels.

:func:`draw_all` saves the three as PNG and PDF with a record each (``heterofl reproduce`` calls it).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from . import plots
from .config import LEVEL_RATES, parse_control
from .sizes import human, level_size
from .slicing import Slicer

PICTURES = ("round_diagram", "nested_submodels", "cheat_sheet")
EXAMPLE = "1_100_0.1_iid_fix_a1-e1_bn_1_1"  # the paper's users, half at full width, half at 1/16
SERVER, CLIENT, DATA = "#dbe5f1", "#e8f4e8", "#fff2cc"


def _box(ax: plt.Axes, x: float, y: float, w: float, h: float, title: str, body: str, color: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.15", fc=color, ec="0.3", lw=2))
    ax.text(x + w / 2, y + h - 0.22, title, ha="center", va="top", fontsize=19, fontweight="bold")
    ax.text(x + w / 2, y + h - 0.75, body, ha="center", va="top", fontsize=15, linespacing=1.35)


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], label: str,
           offset: tuple[float, float] = (0, 0), color: str = "0.2") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=28, lw=2.5, color=color))
    mid = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
    ax.text(*mid, label, ha="center", va="center", fontsize=15, color=color,
            bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="none", alpha=0.95))


def round_diagram(control: str = EXAMPLE, dataset: str = "MNIST") -> tuple[plt.Figure, dict]:
    """One round of ``control`` on ``dataset`` as a flow of six steps, each arrow labelled with what travels and
    its size at the paper's settings (expected counts per round under ``fix``). Returns the figure and the
    numbers it shows."""
    cfg = parse_control(control, dataset)
    levels = [level for level, _ in cfg.model_mode]
    shares = {level: share / sum(s for _, s in cfg.model_mode) for level, share in cfg.model_mode}
    active = cfg.active_users
    sizes = {level: level_size(cfg.model, level, resnet_blocks=tuple(cfg.resnet_blocks)) for level in levels}
    per_level = {level: active * shares[level] for level in levels}  # expected clients per round
    down = sum(per_level[level] * sizes[level].mb for level in levels)
    fedavg = active * sizes[levels[0]].mb
    numbers = {"control": control, "active_clients": active, "clients_per_level": per_level,
               "mb_per_client": {level: sizes[level].mb for level in levels},
               "params_per_client": {level: sizes[level].params for level in levels},
               "mb_each_way": down, "fedavg_mb_each_way": fedavg}
    fig, ax = plt.subplots(figsize=(20, 11))
    ax.set_xlim(0, 20)
    ax.set_ylim(0, 11)
    ax.axis("off")
    sent = "\n".join(f"level {level}: {human(sizes[level].params)} params, {sizes[level].mb:.2f} MB"
                     for level in levels)
    _box(ax, 0.3, 7.6, 4.6, 2.6, "1 · plan", f"draw {active} of {cfg.num_users} users\n(seeded: seed, round)\n"
         f"each at its level ({cfg.model_split})", SERVER)
    _box(ax, 7.6, 7.6, 4.8, 2.6, "2 · split", "per level: the first ⌈r·C⌉\nchannels of every layer\n(one sub-model per width)",
         SERVER)
    _box(ax, 15.0, 7.6, 4.7, 2.6, "6 · evaluate", "Global: whole test set\nLocal: each user's test\ndata, with its mask",
         SERVER)
    _box(ax, 7.6, 0.5, 4.8, 2.6, "3 · local training", f"each client: its own data,\n{cfg.local_epochs} local epochs, SGD,\n"
         f"masked loss, Scaler 1/r", CLIENT)
    _box(ax, 15.0, 0.5, 4.7, 2.6, "4 · aggregate", "each entry: mean over\nthe clients holding it\n(count rule)", SERVER)
    _box(ax, 15.0, 4.1, 4.7, 2.5, "5 · sBN", "statistics of a fresh copy:\none pass over training data\n(no model travels)", DATA)
    _arrow(ax, (4.9, 8.9), (7.6, 8.9), "users, levels\n(a few bytes)", (0, 0.75))
    _arrow(ax, (10.0, 7.6), (10.0, 3.1), f"sub-model to each client\n{sent}", (0, 0))
    _arrow(ax, (12.4, 1.8), (15.0, 1.8), "trained\nsub-models back\n(same sizes)", (0, 1.0))  # fits the gap
    _arrow(ax, (17.35, 3.1), (17.35, 4.1), "global model", (1.4, 0))
    _arrow(ax, (17.35, 6.6), (17.35, 7.6), "with statistics", (1.4, 0))
    _arrow(ax, (15.0, 8.9), (12.4, 8.9), "next round:\nthe new global model", (0, -0.75), color="0.45")
    ax.text(0.3, 6.2, f"per round ({control}, {dataset}):\n"
                      + "\n".join(f"  {per_level[level]:g} clients at level {level} (r = {LEVEL_RATES[level]:g})"
                                  for level in levels)
                      + f"\n  {down:.1f} MB down, {down:.1f} MB back\n  FedAvg, everyone at {levels[0]}: {fedavg:.1f} MB each way",
            ha="left", va="top", fontsize=16, family="monospace", linespacing=1.4)
    plots._title(fig, f"One HeteroFL round, and what travels ({dataset}, {control})",
                 "sizes: the authors' count (4 bytes a parameter, 2^20 bytes a MB); clients per round: expected")
    return fig, numbers


def nested_submodels() -> tuple[plt.Figure, dict]:
    """The MNIST CNN's hidden convolution and classifier, each entry coloured by the narrowest level holding it,
    beside each level's size: nested corners, one global model."""
    from functools import partial

    from .families import build_model

    levels = list(LEVEL_RATES)
    slicer = Slicer(partial(build_model, "conv"), global_rate=1.0)
    sizes = {level: level_size("conv", level) for level in levels}
    fig, axes = plt.subplots(1, 3, figsize=(22, 7.5), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    for ax, name in zip(axes[:2], ["features.5.weight", "head.weight"]):
        owner = plots.entry_levels(slicer, name, levels)
        plots.draw_entry_levels(ax, owner, levels, f"{name} {tuple(owner.shape)}")
    colors = plots.level_colors()
    bars = axes[2].barh(levels[::-1], [sizes[l].params for l in levels[::-1]], color=[colors[l] for l in levels[::-1]])
    axes[2].set_xscale("log")
    axes[2].set_xlabel("parameters (log scale)")
    axes[2].set_title("each level alone")
    for bar, level in zip(bars, levels[::-1]):
        axes[2].text(bar.get_width() * 1.1, bar.get_y() + bar.get_height() / 2,
                     f"{human(sizes[level].params)}, {sizes[level].mb:.2f} MB", va="center", fontsize=15)
    axes[2].set_xlim(1e3, 3e7)
    plots._title(fig, "Nested sub-models: level c is the top-left corner of level b, which is that of level a",
                 "MNIST CNN; a client of rate r holds the first ⌈r·C⌉ channels of every hidden layer, every class")
    return fig, {"params": {level: sizes[level].params for level in levels}}


def cheat_sheet() -> tuple[plt.Figure, dict]:
    """One page: levels and rates, the control string field by field, fix against dynamic, Global against Local."""
    fig, ax = plt.subplots(figsize=(20, 12.5))
    ax.axis("off")
    ax.set_xlim(0, 20)
    ax.set_ylim(0, 12.5)
    mono = dict(family="monospace", fontsize=17)
    ax.text(0.2, 12.1, "Levels", fontsize=22, fontweight="bold", va="top")
    rows = "   ".join(f"{level} = {LEVEL_RATES[level]:g}" for level in LEVEL_RATES)
    ax.text(0.2, 11.3, rows + "      width = ⌈r·C⌉   (e: 1/16 of every hidden layer)", va="top", **mono)
    ax.text(0.2, 10.2, "The control string", fontsize=22, fontweight="bold", va="top")
    fields = [("1", "federated (0: one central model)"), ("100", "users"), ("0.1", "share active per round (10 of 100)"),
              ("iid", "data split: iid | non-iid-N (N classes a user) | dir0.3 (Dirichlet α)"), ("fix", "levels: fix (a user keeps one) | dynamic"),
              ("a2-b8", "levels with proportions; the FIRST is the global model"), ("bn", "norm: bn (sBN) | in | ln | gn | none"),
              ("1", "Scaler on (divide by r while training)"), ("1", "masked cross-entropy on")]
    text = "_".join(value for value, _ in fields)
    marks = "".join(str(k + 1).ljust(len(value) + 1) for k, (value, _) in enumerate(fields))
    ax.text(0.6, 9.4, text, va="top", family="monospace", fontsize=26, fontweight="bold")
    ax.text(0.6, 8.75, marks, va="top", family="monospace", fontsize=26, color="0.45")
    for k, (value, meaning) in enumerate(fields):
        ax.text(0.6 + (k // 5) * 10, 7.7 - (k % 5) * 0.55, f"{k + 1}  {meaning}", va="top", fontsize=16)
    ax.text(0.2, 4.75, "fix or dynamic", fontsize=22, fontweight="bold", va="top")
    ax.text(0.2, 4.05, "fix: user i keeps one level for the whole run (a2-b8: users 0-19 a, 20-99 b)\n"
                      "dynamic: every round every user draws a level with the proportions", va="top", fontsize=17,
            linespacing=1.5)
    ax.text(0.2, 2.8, "Global or Local", fontsize=22, fontweight="bold", va="top")
    ax.text(0.2, 2.1, "Global: the global model on the whole test set, no mask; chance: the most frequent class (~10 %)\n"
                      "Local: each user's own test data, scored with its label mask, weighted by samples;\n"
                      "       chance: 1 / (classes a user holds): 50 % under non-iid-2", va="top", fontsize=17,
            linespacing=1.5)
    plots._title(fig, "HeteroFL on one page", "Diao, Ding, Tarokh, ICLR 2021; e.g. 1_100_0.1_iid_fix_a2-b8_bn_1_1")
    return fig, {"example": "1_100_0.1_iid_fix_a2-b8_bn_1_1"}


def draw_all(figures_dir: str | os.PathLike, profile: str = "any") -> list[Path]:
    """Draw the three pictures into ``figures_dir`` (PNG, PDF and a record each; in the caller's style, e.g.
    :func:`plots.use_style`); the paths."""
    saved = []
    for name, (fig, numbers) in (("round_diagram", round_diagram()), ("nested_submodels", nested_submodels()),
                                 ("cheat_sheet", cheat_sheet())):
        meta = plots.record(profile, fig._suptitle.get_text().split("\n")[0], data_source="none: drawn from the library",
                            caption="a picture to project, drawn from the library so it stays true", numbers=numbers)
        saved += plots.save_figure(fig, figures_dir, name, meta)
        plt.close(fig)
    return saved
