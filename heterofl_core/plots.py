"""Figures and tables of the reproduction, styled to read on a projector.

Every saved figure is three files side by side in the figures folder:
``<name>.png``, ``<name>.pdf`` and ``<name>.json``, the record of what made it
(profile, configs, data source, code version, date, and what the profile cut
from the paper's settings). Tables are also written as ``.csv`` and ``.md``.

Functions draw onto new figures and return them; nothing here trains or reads
run folders (see experiments.py).
"""

from __future__ import annotations

import html
import io
import json
import textwrap
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import matplotlib

import matplotlib.lines as mlines
import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from .config import LEVEL_RATES, format_model_mode
from .datasets import get_dataset
from .families import FAMILIES, get_family
from .runs import code_version
from .sizes import human

LEVEL_NAMES = tuple(LEVEL_RATES)
METRIC_LABELS = {
    "global_accuracy": "Global accuracy (%)",
    "local_accuracy": "Local accuracy (%)",
    "global_perplexity": "Global perplexity (masked tokens)",
    "local_perplexity": "Local perplexity (masked tokens)",
    "train_loss": "Training loss (clients' mean)",
}


def use_style() -> None:
    """Seaborn 'talk' context, white grid, colour-blind palette: large type for a projector (no text under
    14 pt; small print goes to a figure's JSON record, not the image)."""
    sns.set_theme(context="talk", style="whitegrid", palette="colorblind",
                  rc={"figure.dpi": 80, "savefig.dpi": 150, "axes.titleweight": "bold",
                      "axes.titlesize": 19, "axes.labelsize": 17, "xtick.labelsize": 15, "ytick.labelsize": 15,
                      "legend.fontsize": 15, "font.size": 15, "legend.frameon": True, "legend.framealpha": 0.9,
                      "figure.constrained_layout.use": True})


def level_colors() -> dict[str, Any]:
    """One fixed colour per level, the same in every figure."""
    palette = sns.color_palette("colorblind", 8)
    return {level: palette[i] for i, level in enumerate(LEVEL_NAMES)}


def _param_axis(ax: plt.Axes) -> None:
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: human(v)))


# ----------------------------------------------------------------------------- the interpolation figure

_PAPER_RED = "#c0392b"  # the paper's numbers, a red diamond beside ours


def interpolation_figure(points: pd.DataFrame, metric: str, title: str, banner: str | None = None, *,
                         paper: dict[str, float] | None = None, paper_label: str = "paper",
                         reference: tuple[float, str] | None = None) -> plt.Figure:
    """The spec's interpolation figure: one panel per global level x (a, b, c, d), all on one value axis; in
    each, one line per smaller level y from y alone through the mixtures x{i}-y{10-i} to x alone (★), against
    the mixture's mean parameters per client. Only what was measured is drawn: each point a marker, the mean
    over seeds with their range as a bar; a thin dotted connector joins a line's measured points in order and
    implies no shape between them. The smallest level alone (e: the same runs in every panel) is one shared
    reference, a grey square with a dashed line across each panel. The top axis gives the share of users at
    level x along the line to that level, ticked where it was measured. ``points`` as
    :func:`heterofl_core.experiments.interpolation_points` returns them.

    ``paper``: a level's value alone in the paper (a red diamond at that level's size, labelled ``paper_label``);
    ``reference``: (value, label) of a level to beat (chance, unigram perplexity), a dash-dot line. Either one
    far off the data does not stretch the axis: it is written at the panel's edge with an arrow ("paper 91.19 ↑").
    Perplexity is drawn on a log axis.
    """
    panels = [x for x in LEVEL_NAMES if x in set(points["panel"])]
    colors = level_colors()
    log = metric.endswith("perplexity")
    smallest = max(points["line"].dropna(), key=LEVEL_NAMES.index, default=None)  # e alone: shared by the panels
    drawn = {x: {row["mix"][0]: row["mean_size"] for _, row in points[points["panel"] == x].iterrows()
                 if row["share_big"] in (0, 1)} for x in panels}  # the levels alone drawn in each panel: their size
    shown = {x: {level: value for level, value in (paper or {}).items() if level in drawn[x]} for x in panels}
    extras = [value for values in shown.values() for value in values.values()] + ([reference[0]] if reference else [])
    low, high = _value_limits(points, extras, log)
    cols = 2 if len(panels) > 1 else 1
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(8.5 * cols, 6.2 * rows + 2.6), squeeze=False, sharey=True,
                             layout="constrained")
    if log:
        _log_axis(axes[0, 0])
        if np.log10(high / low) < 1.5:  # 1, 2 and 5 alone would leave two or three ticks here
            axes[0, 0].yaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1, 1.5, 2, 3, 4, 5, 6, 7, 8)))
    axes[0, 0].set_ylim(low, high)
    legend: dict[str, Any] = {}
    for ax, x in zip(axes.flat, panels):
        panel = points[points["panel"] == x]
        alone = panel[panel["line"].isna()]
        lines = [y for y in LEVEL_NAMES if y in set(panel["line"].dropna())]
        for y in lines:
            line = pd.concat([panel[panel["line"] == y], alone]).sort_values("mean_size")
            ax.plot(line["mean_size"], line["mean"], ls=":", lw=2, color=colors[y], alpha=0.7, zorder=2)
            own = line[line["line"].notna() & ~((line["line"] == smallest) & (line["share_big"] == 0))]
            several = panel["seeds"].map(len).max() > 1
            legend[f"mixtures x{{i}}-{y}{{10-i}}" + (": mean, bar: range over seeds" if several else "")] = _measured(
                ax, own, colors[y], "o", 10)
        if lines:
            legend["dotted: joins measured points only"] = mlines.Line2D([], [], ls=":", lw=2, color="0.35")
            _share_axis(ax, pd.concat([panel[panel["line"] == lines[-1]], alone]),
                        f"share of users at level {x}" + (f" (line {x}–{lines[-1]})" if len(lines) > 1 else ""))
        if smallest in lines:
            end = panel[(panel["line"] == smallest) & (panel["share_big"] == 0)]
            for mean in end["mean"]:
                ax.axhline(mean, ls="--", lw=1.8, color="0.55", zorder=1)
            _measured(ax, end, "0.4", "s", 11)
            alone_words = " (the same runs in every panel)" if len(panels) > 1 else ""
            legend[f"{smallest} alone{alone_words}"] = mlines.Line2D([], [], ls="--", lw=1.8, color="0.55",
                                                                     marker="s", ms=11, mfc="0.4", mec="0.4")
        if not alone.empty:
            _measured(ax, alone, "black", "*", 22)
            legend["x alone: every user at the panel's level x"] = mlines.Line2D([], [], marker="*", ms=22, ls="",
                                                                                  color="black")
        for level, value in shown[x].items():
            if low <= value <= high:
                ax.plot(drawn[x][level], value, marker="D", ms=11, ls="", mfc="none", mew=2.5, color=_PAPER_RED,
                        zorder=6)
                legend[paper_label] = mlines.Line2D([], [], marker="D", ms=11, ls="", mfc="none", mew=2.5,
                                                    color=_PAPER_RED)
            else:  # written at the edge, where the note itself says what it is
                _edge_note(ax, drawn[x][level], value, paper_label.split(" (")[0], _PAPER_RED, value > high)
        if reference is not None:
            if low <= reference[0] <= high:
                ax.axhline(reference[0], ls="-.", lw=2, color="0.2", zorder=1)
                legend[reference[1]] = mlines.Line2D([], [], ls="-.", lw=2, color="0.2")
            else:
                _edge_note(ax, None, reference[0], reference[1].split(" (")[0], "0.2", reference[0] > high)
        ax.set_title(f"global model {x} (rate {LEVEL_RATES[x]:g})")
        ax.set_xlabel("mean parameters per client")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(METRIC_LABELS.get(metric, metric) + (", log scale\n(lower is better)" if log
                                                                else "\n(higher is better)"))
        _param_axis(ax)
        ax.xaxis.set_major_locator(mticker.MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))  # no 1.25M shown as 1.2M
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    order = [k for k in legend if k.startswith("x alone")] + [k for k in legend if k.startswith("mixtures")] + [
        k for k in legend if not k.startswith(("x alone", "mixtures"))]
    fig.legend([legend[k] for k in order], order, loc="outside lower center", ncol=cols)
    _title(fig, title, banner)
    return fig


def _measured(ax: plt.Axes, rows: pd.DataFrame, color: Any, marker: str, size: float) -> Any:
    """Measured points: a marker at each mean with the seeds' range as a bar, nothing joining them; the handle."""
    return ax.errorbar(rows["mean_size"], rows["mean"], yerr=[rows["mean"] - rows["low"], rows["high"] - rows["mean"]],
                       ls="", marker=marker, ms=size, capsize=5, elinewidth=2, color=color, zorder=5)


def _value_limits(points: pd.DataFrame, extras: Sequence[float], log: bool) -> tuple[float, float]:
    """The shared value axis: every point's range over the seeds plus a margin. A reference value (chance, the
    paper's) within half the data's span of it joins it; one farther off would squash the data, so it stays off
    the axis (written at the edge, with room left there for the note)."""
    scale, unscale = (np.log10, lambda v: 10 ** v) if log else (float, float)
    lo, hi = float(scale(points["low"].min())), float(scale(points["high"].max()))
    span = hi - lo or (0.05 if log else max(0.5, abs(hi) * 0.02))  # one seed at one value still gets an axis
    values = [float(scale(v)) for v in extras]
    near = [v for v in values if lo - span / 2 <= v <= hi + span / 2]
    bottom, top = min([lo, *near]), max([hi, *near])
    room = top - bottom
    above, below = any(v > top for v in values), any(v < bottom for v in values)
    return unscale(bottom - room * (0.2 if below else 0.06)), unscale(top + room * (0.2 if above else 0.06))


def _edge_note(ax: plt.Axes, x: float | None, value: float, label: str, color: Any, above: bool) -> None:
    """A value off the axis, written at the panel's top or bottom edge with an arrow pointing to it, at ``x``
    (data) or, for a horizontal reference, at the left."""
    arrow = "↑" if above else "↓"
    y, va = (0.985, "top") if above else (0.015, "bottom")
    if x is None:
        ax.annotate(f"{label} {value:.4g} {arrow}", (0.015, y), xycoords="axes fraction", ha="left", va=va,
                    fontsize=14, color=color)
        return
    left, right = ax.get_xlim()
    on_right = x > (left + right) / 2
    text = f"{label} {value:.4g} {arrow}" if on_right else f"{arrow} {label} {value:.4g}"
    ax.annotate(text, (x, y), xycoords=("data", "axes fraction"), ha="right" if on_right else "left", va=va,
                fontsize=14, color=color, fontweight="bold")


def _share_axis(ax: plt.Axes, line: pd.DataFrame, label: str) -> None:
    """A top axis: the share of users at the panel's level along ``line``, whose mean size grows linearly with
    it, ticked only at the shares measured."""
    if line["mean_size"].nunique() < 2:
        return
    slope, offset = np.polyfit(line["share_big"], line["mean_size"], 1)  # mean size = offset + slope * share
    top = ax.secondary_xaxis("top", functions=(lambda size: (size - offset) / slope,
                                               lambda share: offset + slope * share))
    top.xaxis.set_major_locator(mticker.FixedLocator(sorted(set(line["share_big"]))))
    top.xaxis.set_major_formatter(mticker.PercentFormatter(1.0, decimals=0))
    top.tick_params(labelsize=14)
    top.set_xlabel(label, fontsize=15)


def _log_axis(ax: plt.Axes) -> None:
    """A log y axis labelled at 1, 2 and 5 times powers of ten, in plain numbers."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(mticker.NullFormatter())


def _title(fig: plt.Figure, title: str, banner: str | None) -> None:
    """The figure's title, wrapped, with the banner (profile and reductions) under it."""
    width = int(fig.get_figwidth() * 5.2)
    text = textwrap.fill(title, width) + (f"\n{textwrap.fill(banner, int(width * 1.2))}" if banner else "")
    fig.suptitle(text, fontsize=20, fontweight="bold")


# ----------------------------------------------------------------------------- learning curves

def learning_curves(history: pd.DataFrame, metric: str, title: str, banner: str | None = None,
                    names: Iterable[str] | None = None) -> plt.Figure:
    """Left: the clients' training loss per round; right: ``metric`` at every evaluated round. One line per run;
    ``banner``: the profile and its reductions, under the title."""
    wanted = list(names) if names is not None else list(dict.fromkeys(history["name"]))
    frame = history[history["name"].isin(wanted)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 6.2))
    palette = dict(zip(wanted, sns.color_palette("colorblind", len(wanted))))
    for name in wanted:
        run = frame[frame["name"] == name]
        loss = run[run["metric"] == "train_loss"].sort_values("round")
        score = run[run["metric"] == metric].sort_values("round")
        left.plot(loss["round"], loss["value"], lw=2.5, marker="o", ms=5, color=palette[name], label=name)
        right.plot(score["round"], score["value"], lw=2.5, marker="o", ms=7, color=palette[name], label=name)
    left.set(xlabel="round", ylabel=METRIC_LABELS["train_loss"], title="local training")
    right.set(xlabel="round", ylabel=METRIC_LABELS.get(metric, metric), title="global model on the test set")
    last = int(frame["round"].max()) if len(frame) else 1
    for ax in (left, right):
        ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
        ax.set_xlim(0.5, last + 0.5)
    if metric.endswith("perplexity"):
        _log_axis(right)
        right.set_ylabel(METRIC_LABELS[metric].split(" (")[0] + ", log scale\n(lower is better)")
    right.legend(loc="best")
    _title(fig, title, banner)
    return fig


class LiveCurves:
    """An ``on_round`` callback that redraws the learning curves while a run trains.

    Interactive (a notebook with a frontend): a picture widget is redrawn every round, with a caption
    saying which round it shows. Otherwise (papermill, plain Python): it stays silent, and keeps the
    last frame in ``self.frame``; the notebook draws the final curves itself.
    """

    def __init__(self, metric: str, title: str, interactive: bool = False) -> None:
        self.metric, self.title = metric, title
        self.interactive = interactive and widgets_available()
        self.frame: pd.DataFrame | None = None
        self.view: FigureView | None = None
        if self.interactive:
            from IPython.display import display
            self.view = FigureView(f"{title}: waiting for the first round")
            display(self.view.widget)

    def __call__(self, round_: int, frame: pd.DataFrame) -> None:
        self.frame = frame
        if self.view is None:
            return
        heading = f"{self.title}: round {round_}"
        self.view.show(lambda: (learning_curves(frame.assign(name=self.title), self.metric, heading), None,
                                html.escape(heading)))


# Every interactive figure is drawn under this lock, one at a time, whichever thread asks (JupyterLab 4.6 sends
# widget messages to kernel subshells by default: callbacks can run beside each other and beside a cell).
_DRAW_LOCK = threading.RLock()


def figure_png(fig: plt.Figure) -> bytes:
    """Close ``fig``, then draw it to PNG bytes on a canvas of its own (as the inline backend shows figures).

    Closing first takes the figure out of pyplot's registry, so the inline backend's post-execute flush, which
    the kernel also runs after a widget message handled on another thread (a subshell), cannot draw the same
    figure at the same moment: two threads drawing one canvas clear each other's buffer and leave a transparent
    image. The fresh canvas gives this drawing its own buffer even if such a flush had started before.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    plt.close(fig)
    FigureCanvasAgg(fig)  # becomes fig.canvas
    buffer = io.BytesIO()
    with _DRAW_LOCK:
        fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor=fig.get_facecolor(),
                    edgecolor=fig.get_edgecolor())
    return buffer.getvalue()


class FigureView:
    """A caption, a figure and an optional table as widgets; :meth:`show` replaces them in place (the figure is
    an ``Image`` widget's PNG).

    Not an ``Output`` widget with ``display(fig)``: the frontend echoes every change of an Output back to the
    kernel, which handles the echo on a subshell and then runs the inline backend's flush over the figures still
    open, drawing the one being displayed at the same time (the transparent figure of JupyterLab 4.6). Here a
    figure is closed before it is drawn (:func:`figure_png`), calls are serialised, and each call draws the
    newest state its caller reads. An error is shown where the figure was, as an Output would show it.
    """

    def __init__(self, caption: str = "") -> None:
        import ipywidgets as w

        self.caption = w.HTML(value=html.escape(caption))
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%", height="auto"))
        self.image.layout.display = "none"
        self.table = w.HTML()
        self.widget = w.VBox([self.caption, self.image, self.table])
        self.lock = threading.RLock()

    def show(self, draw: Callable[[], tuple[plt.Figure, pd.DataFrame | None, str]]) -> None:
        """Show what ``draw()`` returns: a figure, a table or None, and a caption (HTML). A ValueError from it is
        shown as a message instead (e.g. a selection that makes no figure)."""
        with self.lock:
            try:
                fig, table, caption = draw()
                png = figure_png(fig)
            except ValueError as error:  # a selection that makes no figure: say why
                self.message(str(error))
                return
            except Exception as error:  # a bug: shown, and a training run calling back goes on
                import traceback

                self.message(f"could not draw: {type(error).__name__}: {error}")
                self.table.value = f"<pre>{html.escape(traceback.format_exc())}</pre>"
                return
            self.caption.value = caption
            self.image.value = png
            self.image.layout.display = None
            self.table.value = "" if table is None else (  # styled as JupyterLab shows a DataFrame
                '<div class="jp-RenderedHTMLCommon">'
                + table.to_html().replace("<table ", '<table style="margin-left: 0" ', 1) + "</div>")

    def message(self, text: str) -> None:
        """Show ``text`` instead of a figure."""
        with self.lock:
            self.caption.value = f"<b>{html.escape(text)}</b>"
            self.image.layout.display = "none"
            self.table.value = ""


def widgets_available() -> bool:
    """True inside an IPython kernel with ipywidgets installed (a frontend may show them)."""
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


# ----------------------------------------------------------------------------- width slicing pictures

def entry_levels(slicer: Any, name: str, levels: Sequence[str]) -> np.ndarray:
    """For a parameter of the global model: per entry, the index (into ``levels``) of the narrowest
    level that holds it; -1 where none of them does. Axes beyond the first two are reduced away."""
    with torch.device("meta"):
        shape = slicer.build(slicer.global_rate).state_dict()[name].shape
    owner = torch.full(shape, -1, dtype=torch.int64)
    for index, level in sorted(enumerate(levels), key=lambda p: -LEVEL_RATES[p[1]]):  # widest first
        piece = slicer.slices(LEVEL_RATES[level])[name]
        piece.region(owner).fill_(index)
    grid = owner if owner.dim() <= 2 else owner.flatten(2)[..., 0]  # (out, in): kernel taps share their owner
    return (grid if grid.dim() == 2 else grid[:, None]).numpy()


def draw_entry_levels(ax: plt.Axes, owner: np.ndarray, levels: Sequence[str], title: str) -> None:
    """Colour each entry of a (rows, cols) parameter by the narrowest level holding it."""
    colors = level_colors()
    cmap = matplotlib.colors.ListedColormap(["0.92"] + [colors[level] for level in levels])
    ax.imshow(owner + 1, cmap=cmap, vmin=0, vmax=len(levels), interpolation="nearest", aspect="auto")
    ax.set_title(title, fontsize=14)
    ax.set_xlabel("input axis")
    ax.set_ylabel("output axis")
    ax.grid(False)
    handles = [matplotlib.patches.Patch(color=colors[l], label=f"{l} (rate {LEVEL_RATES[l]:g}) and wider")
               for l in levels]
    ax.legend(handles=handles, fontsize=14, loc="lower right")


def footprint(slicer: Any, name: str, rate: float, labels: Sequence[int] | None = None,
              value: float | torch.Tensor = 1.0) -> np.ndarray:
    """A global-shaped array: ``value`` (a number, or the client's tensor of ``name``) on the entries a
    rate-``rate`` client adds into ``name`` during aggregation (only its labels' rows in a LABELS axis),
    NaN elsewhere."""
    from .slicing import LABELS

    with torch.device("meta"):
        shape = slicer.build(slicer.global_rate).state_dict()[name].shape
    out = torch.full(shape, float("nan"))
    piece = slicer.slices(rate)[name]
    if isinstance(value, torch.Tensor):
        piece.region(out).copy_(piece.local_view(value.float()))
    else:
        piece.region(out).fill_(value)
    if labels is not None and piece.rules[0] == LABELS:
        keep = torch.zeros(shape[0], dtype=torch.bool)
        keep[list(labels)] = True
        out[~keep] = float("nan")
    return out.numpy()


def draw_matrices(matrices: Sequence[np.ndarray], titles: Sequence[str], suptitle: str = "",
                  fmt: str = ".2g", cmap: str = "crest") -> plt.Figure:
    """Small annotated heatmaps side by side (the aggregation toy example)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 4.4), squeeze=False)
    for ax, matrix, title in zip(axes.flat, matrices, titles):
        matrix = np.asarray(matrix, dtype=float)
        annot = matrix.size <= 160
        sns.heatmap(matrix, ax=ax, annot=annot, fmt=fmt, cbar=False, cmap=cmap, linewidths=0.5, linecolor="white",
                    annot_kws={"fontsize": 16}, mask=np.isnan(matrix))  # >= 12 pt on screen at 3 panels a row
        ax.set_title(title, fontsize=14)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():  # frame the whole global tensor, held or not
            spine.set_visible(True)
            spine.set_color("0.6")
    if suptitle:
        fig.suptitle(suptitle, fontsize=18, fontweight="bold")
    return fig


# ----------------------------------------------------------------------------- sub-model extraction

def held_channels_figure(maps: dict[str, Sequence[tuple[int, Sequence[str], np.ndarray]]], layer: str,
                         title: str, banner: str | None = None) -> plt.Figure:
    """One panel per extraction strategy: each round's clients (rows, grouped by round) against the
    channels of one layer (columns), a channel coloured by the client's level where it holds it.

    ``maps[strategy]``: per round, (round, the clients' levels, bool array clients x channels).
    """
    colors = level_colors()
    levels = [l for l in LEVEL_NAMES if any(l in lv for rounds in maps.values() for _, lv, _ in rounds)]
    cmap = matplotlib.colors.ListedColormap(["0.94"] + [colors[level] for level in levels])
    rows = max(sum(len(lv) for _, lv, _ in rounds) for rounds in maps.values())
    fig, axes = plt.subplots(1, len(maps), figsize=(6.2 * len(maps), 2.2 + 0.34 * rows), squeeze=False)
    for ax, (strategy, rounds) in zip(axes.flat, maps.items()):
        image = np.concatenate([np.where(held, np.array([levels.index(l) + 1 for l in lv])[:, None], 0)
                                for _, lv, held in rounds])
        ax.imshow(image, cmap=cmap, vmin=0, vmax=len(levels), interpolation="nearest", aspect="auto")
        starts = np.cumsum([0] + [len(lv) for _, lv, _ in rounds])
        for row in range(1, len(image)):  # clients apart in white, rounds apart in black
            ax.axhline(row - 0.5, color="black" if row in starts else "white", lw=2.5 if row in starts else 1)
        ax.set_yticks((starts[:-1] + starts[1:] - 1) / 2, [f"round {r}" for r, _, _ in rounds])
        ax.set_xlabel(f"channel of {layer}")
        ax.set_title(strategy)
        ax.grid(False)
    handles = [matplotlib.patches.Patch(color=colors[l], label=f"{l} (rate {LEVEL_RATES[l]:g})") for l in levels]
    handles.append(matplotlib.patches.Patch(color="0.94", label="not held"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
    _title(fig, title, banner)
    return fig


def seed_comparison(summary: pd.DataFrame, metric: str, by: str, title: str, banner: str | None = None, *,
                    panel: str | None = None, labels: dict[str, str] | None = None,
                    reference: tuple[float, str] | None = None) -> plt.Figure:
    """``final_<metric>`` of runs grouped by the column ``by`` (x, in order of first appearance): a dot per
    seed, a thin grey line joining one seed's runs (the same seed draws the same rounds: a paired comparison),
    a bar at the mean with its value. ``panel``: one panel per value of that column (shared y axis);
    ``labels``: x tick text per value of ``by``; ``reference``: (value, label) drawn dashed (chance)."""
    panels = list(dict.fromkeys(summary[panel])) if panel else [None]
    groups = list(dict.fromkeys(summary[by]))
    column = f"final_{metric}"
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.5, 2.6 * len(groups) + 2) * len(panels), 6.4),
                             squeeze=False, sharey=True)
    palette = dict(zip(groups, sns.color_palette("colorblind", len(groups))))
    for ax, name in zip(axes.flat, panels):
        runs = summary if panel is None else summary[summary[panel] == name]
        for _, seed_runs in runs.groupby("seed"):
            xs = [groups.index(g) for g in seed_runs[by]]
            ax.plot(xs, seed_runs[column].to_numpy(dtype=float), color="0.6", lw=1.2, zorder=1)
        for x, group in enumerate(groups):
            values = runs.loc[runs[by] == group, column].to_numpy(dtype=float)
            if not len(values):
                continue
            ax.plot([x] * len(values), values, "o", ms=11, color=palette[group], alpha=0.9, zorder=3)
            mean = values.mean()
            ax.hlines(mean, x - 0.25, x + 0.25, color="black", lw=3, zorder=2)
            ax.annotate(f"{mean:.2f}", (x + 0.27, mean), textcoords="offset points", xytext=(2, -6), fontsize=15)
        ax.set_xticks(range(len(groups)), [textwrap.fill((labels or {}).get(g, g), 16) for g in groups])
        ax.set_xlim(-0.6, len(groups) - 0.4)
        if name is not None:
            ax.set_title(f"{name}")
    if reference is not None:  # near the data: a dashed line; far off: a note at the edge (no squashed dots)
        values = summary[column].to_numpy(dtype=float)
        low, high = float(values.min()), float(values.max())
        span = max(high - low, 1.0)
        near = low - span / 2 <= reference[0] <= high + span / 2
        bottom, top = min(low, reference[0]) if near else low, max(high, reference[0]) if near else high
        margin = (top - bottom) * (0.18 if not near else 0.08)
        axes.flat[0].set_ylim(bottom - margin, top + margin)
        for ax in axes.flat:
            if near:
                ax.axhline(reference[0], ls="--", lw=2, color="0.45")
                ax.annotate(reference[1], (-0.55, reference[0]), textcoords="offset points", xytext=(0, 5),
                            fontsize=14, color="0.35")
            else:
                _edge_note(ax, None, reference[0], reference[1], "0.35", reference[0] > high)
    lower_is_better = metric.endswith("perplexity")
    axes.flat[0].set_ylabel(METRIC_LABELS.get(metric, metric) + ("\n(lower is better)" if lower_is_better
                                                                  else "\n(higher is better)"))
    _title(fig, title, banner)
    return fig


def strategy_comparison(summary: pd.DataFrame, metric: str, title: str, banner: str | None = None,
                        reference: tuple[float, str] | None = None) -> plt.Figure:
    """One panel per ``model_split`` (fix, dynamic levels): ``final_<metric>`` against the extraction strategy
    (:func:`seed_comparison`); ``reference``: (value, label) drawn dashed, e.g. chance."""
    fig = seed_comparison(summary.assign(model_split=summary["model_split"] + " levels"), metric, "extraction",
                          title, banner, panel="model_split", reference=reference)
    for ax in fig.axes:
        ax.set_xlabel("extraction")
    return fig


# ----------------------------------------------------------------------------- the rate / mixture explorer

EXPLORER_VOCAB = 2000  # a text family's vocabulary is drawn with at most this many rows


def _mode_of(proportions: dict[str, int]) -> str:
    return format_model_mode(tuple((level, share) for level in LEVEL_NAMES if (share := proportions.get(level, 0)) > 0))


def mixture_view(model: str, proportions: dict[str, int], layer: str | None = None,
                 vocab_size: int | None = None) -> tuple[plt.Figure, pd.DataFrame]:
    """Which entries of one parameter each level of a mixture holds, and the mixture's sizes.

    ``proportions`` maps levels to integer shares (0 = absent); the widest present level is the global model.
    """
    from .sizes import mixture_sizes, size_builder
    from .slicing import Slicer

    family = get_family(model)
    mode = _mode_of(proportions)
    if not mode:
        raise ValueError("give at least one level a proportion above 0")
    levels = [level for level in LEVEL_NAMES if proportions.get(level, 0) > 0]
    drawn = min(vocab_size or get_dataset(family.paper_dataset).classes, EXPLORER_VOCAB)
    slicer = Slicer(size_builder(model, levels[0], vocab_size=drawn)[0], LEVEL_RATES[levels[0]])
    layer = layer or family.shown_parameters[0]
    owner = entry_levels(slicer, layer, levels)
    sizes = mixture_sizes(model, mode, vocab_size=vocab_size)
    table = pd.DataFrame([{"model": r.model_mode, "share": f"{proportions.get(r.model_mode, 0)}"
                           if r.model_mode in LEVEL_NAMES else "mixture", "params": human(r.params),
                           "FLOPs": human(r.flops), "MB": f"{r.mb:.2f}", "ratio": f"{r.ratio:.3f}"} for r in sizes])
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    shown = f" (vocabulary drawn as {drawn} rows)" if family.data_kind == "text" and owner.shape[0] == drawn else ""
    draw_entry_levels(left, owner, levels, f"{family.display} {layer}: global {tuple(owner.shape)}{shown}")
    level_rows = [r for r in sizes if r.model_mode in LEVEL_NAMES]
    colors = level_colors()
    right.bar([r.model_mode for r in level_rows], [r.params for r in level_rows],
              color=[colors[r.model_mode] for r in level_rows])
    right.axhline(sizes[-1].params, color="black", ls="--", lw=2, label=f"mixture mean {human(sizes[-1].params)}")
    right.set_yscale("log")
    right.set(ylabel="parameters (log scale)", title=f"mixture {mode}")
    right.legend()
    return fig, table


def mixture_explorer(model: str = "conv", proportions: dict[str, int] | None = None, interactive: bool = True,
                     vocab_size: int | None = None) -> tuple[plt.Figure, pd.DataFrame] | None:
    """Pick a model, levels and proportions, and a layer; see which entries each client level holds and the
    mixture's parameters, FLOPs and MB. Without a frontend: the static view of the given selection."""
    from IPython.display import display

    proportions = dict(proportions or {level: 1 for level in LEVEL_NAMES})
    if not (interactive and widgets_available()):
        fig, table = mixture_view(model, proportions, None, vocab_size)
        display(table)
        return fig, table
    import ipywidgets as w

    model_box = w.Dropdown(options=list(FAMILIES), value=model, description="model")
    layer_box = w.Dropdown(options=get_family(model).shown_parameters, description="layer")
    sliders = {level: w.IntSlider(value=proportions.get(level, 0), min=0, max=10,
                                  description=f"{level} (r={LEVEL_RATES[level]:g})") for level in LEVEL_NAMES}
    view = FigureView()

    def draw() -> tuple[plt.Figure, pd.DataFrame, str]:
        """The current selection, read inside the view's lock: the last redraw shows the newest state."""
        chosen, layer = model_box.value, layer_box.value
        shares = {level: s.value for level, s in sliders.items()}
        fig, table = mixture_view(chosen, shares, layer, vocab_size)
        caption = (f"<b>{html.escape(get_family(chosen).display)}</b> ({html.escape(chosen)}), layer "
                   f"<code>{html.escape(str(layer))}</code>, mixture <code>{html.escape(_mode_of(shares))}</code>")
        return fig, table, caption

    def redraw(*_: Any) -> None:
        view.show(draw)

    def new_model(change: dict[str, Any]) -> None:
        with view.lock:  # no redraw between the new model and its layers
            layer_box.options = get_family(change["new"]).shown_parameters  # triggers redraw through layer_box

    model_box.observe(new_model, names="value")
    for control in (layer_box, *sliders.values()):
        control.observe(redraw, names="value")
    display(w.VBox([w.HBox([model_box, layer_box]), w.HBox(list(sliders.values())[:3]),
                    w.HBox(list(sliders.values())[3:]), view.widget]))
    redraw()
    return None


# ----------------------------------------------------------------------------- tables

def table_figure(table: pd.DataFrame, title: str, banner: str | None = None,
                 highlight: Callable[[pd.Series], bool] | None = None) -> plt.Figure:
    """A table drawn as a figure (for slides): bold header, zebra rows, optional highlighted rows; ``banner``
    (the profile and its reductions) under the title. Small print belongs in the record, not here."""
    cells = table.astype(str).values.tolist()
    widths = [max(len(str(c)) for c in [col, *table[col].astype(str)]) + 2 for col in table.columns]
    fig_w = min(30, max(10, 0.17 * sum(widths) + 1))
    table_h = 0.48 * (len(cells) + 1)
    title_lines = len(textwrap.wrap(title, int(fig_w * 5.2))) + (len(textwrap.wrap(banner, int(fig_w * 6.2)))
                                                                   if banner else 0)
    fig = plt.figure(figsize=(fig_w, table_h + 0.45 * title_lines + 0.4), layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    drawn = ax.table(cellText=cells, colLabels=list(table.columns), cellLoc="center", bbox=[0, 0, 1, 1],
                     colWidths=[w / sum(widths) for w in widths])
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(14)
    for (row, _), cell in drawn.get_celld().items():
        cell.set_edgecolor("0.8")
        if row == 0:
            cell.set_text_props(fontweight="bold")
            cell.set_facecolor("#dbe5f1")
        elif highlight is not None and highlight(table.iloc[row - 1]):
            cell.set_facecolor("#fff2cc")
        elif row % 2 == 0:
            cell.set_facecolor("0.96")
    _title(fig, title, banner)
    return fig


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub pipe table (no extra dependency)."""
    cells = [[str(c) for c in table.columns]] + table.astype(str).values.tolist()
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


# ----------------------------------------------------------------------------- saving, with a record

def record(profile: str, title: str, *, data_source: str | Sequence[str], configs: Sequence[dict[str, Any]] = (),
           reductions: Sequence[str] = (), caption: str = "", **extra: Any) -> dict[str, Any]:
    """What made a figure: profile, configs, data source, code version, date, and what was cut."""
    return {"title": title, "caption": caption, "profile": profile, "data_source": data_source,
            "reductions": list(reductions), "code_version": code_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra, "configs": list(configs)}


def save_figure(fig: plt.Figure, figures_dir: str | Path, name: str, meta: dict[str, Any],
                also: Sequence[Path] = ()) -> list[Path]:
    """``<name>.png``, ``<name>.pdf`` and the record ``<name>.json``, which lists them and the files ``also``
    written beside them (a table's .csv and .md); returns the paths."""
    folder = Path(figures_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf", folder / f"{name}.json"]
    fig.savefig(paths[0], bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    files = [p.name for p in [*paths[:2], *also, paths[2]]]
    strict = _strict_json({"figure": name, "files": files, **meta})
    paths[2].write_text(json.dumps(strict, indent=2, default=str, allow_nan=False) + "\n")
    return paths


def write_figure_index(figures_dir: str | Path) -> pd.DataFrame:
    """``README.md`` of the figures folder: every figure with its record (profile, code, date, caption), from the
    records there now; returns the index as a table. ``heterofl reproduce`` writes it after the last notebook."""
    folder = Path(figures_dir)
    records = [r for r in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))) if "figure" in r]
    lines = ["# Figures", "", "Written by `heterofl reproduce` (the notebooks that draw figures: 05 to 12). Each figure "
             "has a JSON record beside it: profile, configs, data source, code version, date, and what the profile "
             "cut from the paper's settings.", ""]
    for r in records:
        trained = [f"trained with: {', '.join(v['code_version'] for v in r['trained_with'])}  "] \
            if r.get("trained_with") else []
        lines += [f"## {r['figure']}: {r['title']}", "", f"![{r['figure']}]({r['figure']}.png)", "",
                  f"profile `{r['profile']}`, drawn by code `{r['code_version']}`, {r['date']}  ", *trained,
                  *(f"{line}  " for line in r.get("caption", "").split(" | ") if line), ""]
    (folder / "README.md").write_text("\n".join(lines))
    return pd.DataFrame([{"figure": r["figure"], "title": r["title"], "profile": r["profile"], "date": r["date"],
                          "files": ", ".join(r["files"])} for r in records])


def _strict_json(value: Any) -> Any:
    """``value`` with every NaN (a missing number, e.g. the line of an x-alone point) as None: strict JSON."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def save_table(table: pd.DataFrame, figures_dir: str | Path, name: str, meta: dict[str, Any],
               note: str | Sequence[str] | None = None,
               highlight: Callable[[pd.Series], bool] | None = None) -> list[Path]:
    """A table as ``.csv`` and ``.md`` (``note`` and the record under it) and drawn as ``.png``/``.pdf`` (title and
    the record's ``banner``), with its record."""
    folder = Path(figures_dir)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    table.to_csv(csv, index=False)
    notes = [note] if isinstance(note, str) else list(note or [])
    md.write_text(f"**{meta.get('title', name)}**\n\n{markdown_table(table)}\n\n"
                  + "".join(f"{line}  \n" for line in notes)
                  + f"\nprofile `{meta.get('profile')}`, code `{meta.get('code_version')}`, {meta.get('date')}\n")
    fig = table_figure(table, meta.get("title", name), meta.get("banner"), highlight)
    try:
        paths = save_figure(fig, folder, name, meta, also=[csv, md])
    finally:
        plt.close(fig)
    return [*paths[:2], csv, md, paths[2]]
