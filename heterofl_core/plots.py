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

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from .config import LEVEL_RATES, format_model_mode
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

def interpolation_figure(points: pd.DataFrame, metric: str, title: str, banner: str | None = None, *,
                         paper: dict[str, float] | None = None, paper_label: str = "paper",
                         reference: tuple[float, str] | None = None) -> plt.Figure:
    """The spec's interpolation figure: one panel per global level x (a, b, c, d); in each, one line per
    smaller level y from y alone through the mixtures x{i}-y{10-i} to x alone, against the mixture's mean
    parameters; each point the mean over seeds with its range (bar and band), labelled with the share of
    users at level x. ``points`` as :func:`heterofl_core.experiments.interpolation_points` returns them.

    ``paper``: a level's value alone in the paper (drawn at that level's size, labelled ``paper_label``);
    ``reference``: (value, label) of a level to beat, drawn as a dashed line (chance, unigram perplexity).
    Perplexity is drawn on a log axis.
    """
    panels = [x for x in LEVEL_NAMES if x in set(points["panel"])]
    colors = level_colors()
    cols = 2 if len(panels) > 1 else 1
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(8.5 * cols, 6.4 * rows + 1.2), squeeze=False)
    lower_is_better = metric.endswith("perplexity")
    for ax, x in zip(axes.flat, panels):
        panel = points[points["panel"] == x]
        alone = panel[panel["line"].isna()]
        for y in [level for level in LEVEL_NAMES if level in set(panel["line"].dropna())]:
            line = pd.concat([panel[panel["line"] == y], alone]).sort_values("mean_size")
            ax.fill_between(line["mean_size"], line["low"], line["high"], color=colors[y], alpha=0.18, lw=0)
            ax.errorbar(line["mean_size"], line["mean"], yerr=[line["mean"] - line["low"], line["high"] - line["mean"]],
                        marker="o", lw=2.5, ms=8, capsize=5, color=colors[y], label=f"{x}–{y}: mean, range")
            for _, point in line.iterrows():
                share = f"{point['share_big']:.0%}" + (f" ({y} alone)" if point["share_big"] == 0 else "")
                ax.annotate(share, (point["mean_size"], point["mean"]), textcoords="offset points",
                            xytext=(6, -18 if lower_is_better else 8), fontsize=14, color=colors[y])
        if not alone.empty:
            ax.plot(alone["mean_size"], alone["mean"], marker="*", ms=22, ls="", color="black", label=f"{x} alone",
                    zorder=5)
        drawn = {row["mix"][0]: row["mean_size"] for _, row in panel.iterrows() if row["share_big"] in (0, 1)}
        shown = {level: value for level, value in (paper or {}).items() if level in drawn}
        if shown:
            ax.plot([drawn[level] for level in shown], list(shown.values()), marker="D", ms=11, ls="",
                    mfc="none", mew=2.5, color="#c0392b", label=paper_label, zorder=6)
        if reference is not None:
            ax.axhline(reference[0], ls="--", lw=2, color="0.45", label=reference[1])
        if lower_is_better:
            _log_axis(ax)
        ax.set_title(f"global model {x} (rate {LEVEL_RATES[x]:g})")
        ax.set_xlabel("mean parameters per client")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric) + (", log scale\n(lower is better)" if lower_is_better
                                                            else "\n(higher is better)"))
        _param_axis(ax)
        ax.legend(loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _title(fig, title, banner)
    return fig


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
              value: float = 1.0) -> np.ndarray:
    """A global-shaped array: ``value`` on the entries a rate-``rate`` client adds into ``name`` during
    aggregation (only its labels' rows in a LABELS axis), NaN elsewhere."""
    from .slicing import LABELS

    with torch.device("meta"):
        shape = slicer.build(slicer.global_rate).state_dict()[name].shape
    out = torch.full(shape, float("nan"))
    piece = slicer.slices(rate)[name]
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


def strategy_comparison(summary: pd.DataFrame, metric: str, title: str, banner: str | None = None) -> plt.Figure:
    """One panel per ``model_split`` (fix, dynamic): ``final_<metric>`` against the extraction
    strategy, a dot per seed and a bar at their mean (labelled)."""
    splits = list(dict.fromkeys(summary["model_split"]))
    strategies = list(dict.fromkeys(summary["extraction"]))
    column = f"final_{metric}"
    fig, axes = plt.subplots(1, len(splits), figsize=(7.5 * len(splits), 6.4), squeeze=False, sharey=True)
    palette = dict(zip(strategies, sns.color_palette("colorblind", len(strategies))))
    for ax, split in zip(axes.flat, splits):
        panel = summary[summary["model_split"] == split]
        for x, strategy in enumerate(strategies):
            values = panel.loc[panel["extraction"] == strategy, column].to_numpy(dtype=float)
            if not len(values):
                continue
            spread = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
            ax.plot(x + spread, values, "o", ms=10, color=palette[strategy], alpha=0.8)
            mean = values.mean()
            ax.hlines(mean, x - 0.25, x + 0.25, color="black", lw=3)
            ax.annotate(f"{mean:.2f}", (x, mean), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=15)
        ax.set_xticks(range(len(strategies)), strategies)
        ax.set_xlim(-0.6, len(strategies) - 0.4)
        ax.set_title(f"{split} levels")
        ax.set_xlabel("extraction")
    lower_is_better = metric.endswith("perplexity")
    axes.flat[0].set_ylabel(METRIC_LABELS.get(metric, metric) + ("\n(lower is better)" if lower_is_better
                                                                  else "\n(higher is better)"))
    _title(fig, title, banner)
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
    drawn = min(vocab_size or family.classes, EXPLORER_VOCAB)
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
