"""The experiments behind the notebooks' figures: grids of configs, and how they are presented.

A notebook says what it wants (the interpolation grid of a dataset, the CIFAR10
table, the ablation) at the scale its profile asks for; this module turns that
into :class:`~heterofl_core.run_cache.Experiment` s and runs them through the run cache
(run_cache.py: a finished run is read back, an interrupted one continues).

Scale: the paper's settings (spec section 7) come from ``parse_control``; a
:class:`Scale` replaces the few fields a cheaper profile shrinks (rounds,
users, local epochs, evaluation cost, data subsets) and says so in words
(:meth:`Scale.reductions`), which the figures print.

Nothing here decides a result beyond the configs it builds, which the cache's key holds:
this module is presentation (runs.PRESENTATION_MODULES), so editing a caption retrains nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .config import EXTRACTIONS, LEVEL_RATES, ExperimentConfig, dataset_family, format_model_mode, paper_preset, \
    parse_control, parse_model_mode
from .data import TextData, repo_root, resolve_data_root
from .datasets import get_dataset, status_of
from .evaluation import global_chance
from .families import get_family
from .federated import RoundCallback
from .run_cache import DataSpec, Experiment, run_cached
from .sizes import DEFAULT_VOCAB_SIZE, human, mixture_sizes

LEVELS = tuple(LEVEL_RATES)  # a, b, c, d, e: widest first
PAPER_USERS = 100
PAPER_FRAC = 0.1


# ----------------------------------------------------------------------------- where things live

def default_out_dir() -> Path:
    """Where a notebook run by hand keeps its runs and figures: reproduction/interactive of the checkout
    (git-ignored); for a package installed outside a checkout (a hosted notebook), ~/.cache/heterofl/interactive."""
    checkout = repo_root()
    if not (checkout / "pyproject.toml").is_file():
        return Path("~/.cache/heterofl/interactive").expanduser()
    return checkout / "reproduction" / "interactive"


def notebook_paths(data_root: str | os.PathLike | None, out_dir: str | os.PathLike | None,
                   figures_dir: str | os.PathLike | None) -> tuple[Path, Path, Path]:
    """(data root, runs folder, figures folder) for a notebook's path parameters (``None`` = the defaults;
    the data root by the one rule of :func:`heterofl_core.data.resolve_data_root`)."""
    out = Path(out_dir).expanduser() if out_dir else default_out_dir()
    figures = Path(figures_dir).expanduser() if figures_dir else out / "figures"
    return resolve_data_root(data_root), out / "runs", figures


def text_corpus(data_root: str | os.PathLike | None = None) -> tuple[str, str]:
    """(corpus name, note): WikiText2 when a copy is at the data root, else SOTU, said plainly."""
    root = resolve_data_root(data_root)
    if status_of("WikiText2", root).found:
        return "WikiText2", "WikiText2"
    if status_of("SOTU", root).found:
        return "SOTU", ("no WikiText2 copy at the data root: the WikiText2 Transformer runs on SOTU "
                        "(State of the Union addresses, same file format); its perplexities are not "
                        "comparable with published WikiText2 numbers")
    raise FileNotFoundError(f"neither WikiText2 nor SOTU found under {root}; `heterofl data status` shows the layouts")


# ----------------------------------------------------------------------------- scale

@dataclass(frozen=True)
class Scale:
    """What a profile changes from the paper's settings; ``None`` keeps the paper's value.

    ``milestones`` ``None`` keeps the paper's learning-rate milestones when the
    rounds are the paper's, and drops them (constant lr) when rounds are cut: the
    paper's decay points lie beyond a shortened schedule.
    """

    rounds: int | None = None
    local_epochs: int | None = None
    num_users: int | None = None
    frac: float | None = None
    eval_every: int = 1
    sbn_samples: int = 0
    train_samples: int | None = None
    test_samples: int | None = None
    milestones: tuple[int, ...] | None = None

    @classmethod
    def from_params(cls, **params: Any) -> Scale:
        """From a profile's settings (profiles.py); lists become tuples, unknown names are refused."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown scale settings {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items()})

    def config(self, dataset: str, control: str, **overrides: Any) -> ExperimentConfig:
        """The paper's config for ``control`` on ``dataset``, then this scale, then ``overrides``."""
        cfg = parse_control(control, dataset)
        changes: dict[str, Any] = {"eval_every": self.eval_every, "sbn_samples": self.sbn_samples}
        for name in ("rounds", "local_epochs"):
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        rounds = changes.get("rounds", cfg.rounds)
        if self.milestones is not None:
            changes["milestones"] = self.milestones
        elif rounds != cfg.rounds:
            changes["milestones"] = ()
        changes.update(overrides)
        changes["eval_every"] = min(changes["eval_every"], changes.get("rounds", cfg.rounds))
        return cfg.replace(**changes)

    def users(self) -> tuple[int, float]:
        return (self.num_users or PAPER_USERS, self.frac if self.frac is not None else PAPER_FRAC)

    def control(self, mode: str, split: str = "iid", model_split: str = "fix", norm: str = "bn",
                scale: bool = True, mask: bool = True) -> str:
        """A control string at this scale's users, e.g. ``1_10_0.5_iid_fix_a5-b5_bn_1_1``; ``mode`` may
        omit proportions of 1 (``a-e`` is ``a1-e1``)."""
        users, frac = self.users()
        mode = format_model_mode(parse_model_mode(mode, shorthand=True))
        return f"1_{users}_{frac:g}_{split}_{model_split}_{mode}_{norm}_{int(scale)}_{int(mask)}"

    def reductions(self, dataset: str, data_split: str = "iid") -> list[str]:
        """Plain words for every way this scale differs from the paper's settings."""
        paper = paper_preset(dataset, data_split)
        out = []
        users, frac = self.users()
        if (users, frac) != (PAPER_USERS, PAPER_FRAC):
            out.append(f"{users} users, {math.ceil(frac * users - 1e-9)} active per round "
                       f"(paper: {PAPER_USERS}, {math.ceil(PAPER_FRAC * PAPER_USERS)})")
        if self.rounds is not None and self.rounds != paper["rounds"]:
            out.append(f"{self.rounds} round{'s' * (self.rounds != 1)} (paper: {paper['rounds']})")
        if self.local_epochs is not None and self.local_epochs != paper["local_epochs"]:
            out.append(f"{self.local_epochs} local epoch{'s' * (self.local_epochs != 1)} (paper: {paper['local_epochs']})")
        cut = self.rounds is not None and self.rounds != paper["rounds"]
        milestones = self.milestones if self.milestones is not None else (() if cut else paper["milestones"])
        if tuple(milestones) != tuple(paper["milestones"]):
            shown = ", ".join(map(str, milestones)) if milestones else "none, constant lr"
            out.append(f"lr milestones {shown} (paper: {', '.join(map(str, paper['milestones']))})")
        if self.train_samples is not None or self.test_samples is not None:
            unit = "tokens" if get_family(paper["model"]).data_kind == "text" else "samples"
            out.append(f"data subset: {self.train_samples or 'all'} train / {self.test_samples or 'all'} test {unit}")
        if self.sbn_samples:
            out.append(f"sBN statistics over {self.sbn_samples:,} training samples (paper: all)")
        rounds = self.rounds if self.rounds is not None else paper["rounds"]
        if self.eval_every >= rounds > 1:
            out.append("tested once, after the last round (paper: every round)")
        elif self.eval_every != 1:
            out.append(f"tested every {self.eval_every} rounds and after the last (paper: every round)")
        return out


    def banner(self, profile: str, dataset: str, seeds: int = 1, panels: Sequence[str] | None = None,
               data_split: str = "iid") -> str:
        """The profile and its main cuts in a few words, for a figure's banner, e.g.
        "quick: 8 of 200 rounds, 1 of 5 local epochs, 3 seeds"; :meth:`reductions` has them all."""
        paper = paper_preset(dataset, data_split)
        parts = []
        if self.rounds is not None and self.rounds != paper["rounds"]:
            parts.append(f"{self.rounds} of {paper['rounds']} rounds")
        if self.local_epochs is not None and self.local_epochs != paper["local_epochs"]:
            parts.append(f"{self.local_epochs} of {paper['local_epochs']} local epochs")
        users, frac = self.users()
        if (users, frac) != (PAPER_USERS, PAPER_FRAC):
            parts.append(f"{math.ceil(frac * users - 1e-9)} of {users} users per round (paper: 10 of 100)")
        if self.train_samples is not None:
            parts.append(f"{self.train_samples:,} training {'tokens' if get_dataset(dataset).kind == 'text' else 'images'}")
        parts.append(f"{seeds} seed{'s' * (seeds != 1)}")
        if panels is not None and len(panels) < len(LEVELS) - 1:
            parts.append(f"panels {', '.join(panels)} of {', '.join(LEVELS[:-1])}")
        return f"{profile}: {', '.join(parts)}"


def figure_note(profile: str, reductions: Sequence[str], sources: Iterable[str], extra: str = "") -> list[str]:
    """Caption lines under a figure: the profile and what it cut, the data it ran on, anything else."""
    cut = "; ".join(reductions) if reductions else "the paper's settings (spec section 7)"
    lines = [f"profile {profile}: {cut}"] + [f"data: {source}" for source in sources]
    return lines + ([extra] if extra else [])


# ----------------------------------------------------------------------------- experiments and the cache

@dataclass
class Results:
    """What a set of runs produced: one summary row per run, and every run's per-round metrics."""

    summary: pd.DataFrame  # name, labels..., control, folder, final_<metric>, best_<metric>, best_round, params
    history: pd.DataFrame  # name, round, split, metric, value, elapsed_s
    experiments: list[Experiment]
    seconds: float  # wall time spent training in this call (cached runs cost ~0)

    def configs(self) -> list[dict[str, Any]]:
        """Every run's name, its folder under the runs folder and its full config, for a figure's record."""
        folders = dict(zip(zip(self.summary["name"], self.summary["seed"]), self.summary["folder"])) \
            if len(self.summary) else {}
        return [{"name": e.name, "run": "/".join(Path(folders[e.name, e.cfg.seed]).parts[-2:])
                 if (e.name, e.cfg.seed) in folders else None, **e.cfg.to_dict()} for e in self.experiments]

    def data_sources(self) -> list[str]:
        return sorted(set(self.summary["data_source"])) if len(self.summary) else []

    def trained_with(self, allow_mixed: bool = False) -> list[dict[str, str]]:
        """The code versions the runs were trained with (from their run.json), each once. Runs of
        different result-making code in one figure are refused unless ``allow_mixed``."""
        versions = []
        for folder in self.summary["folder"] if len(self.summary) else []:
            saved = json.loads((Path(folder) / "run.json").read_text())
            version = {"code_version": saved.get("code_version", "unknown"),
                       "results_version": saved.get("results_version", "unknown")}
            versions += [version] if version not in versions else []
        if len({v["results_version"] for v in versions}) > 1 and not allow_mixed:
            raise ValueError(f"these runs were trained with different code: {versions}; retrain them "
                             f"(heterofl reproduce --fresh) or pass allow_mixed=True to draw them together")
        return versions


def headline(dataset_or_cfg: str | ExperimentConfig) -> str:
    """The metric a dataset is judged by: global accuracy, or global perplexity for text."""
    model = dataset_or_cfg.model if isinstance(dataset_or_cfg, ExperimentConfig) else paper_preset(dataset_or_cfg)["model"]
    return "global_perplexity" if get_family(model).data_kind == "text" else "global_accuracy"


def run_all(experiments: Sequence[Experiment], runs_dir: str | os.PathLike, *, device: str = "auto",
            on_round: Callable[[Experiment], RoundCallback | None] | None = None, log: bool = True,
            progress: bool = False) -> Results:
    """Run (or read back) every experiment, one line each; summarise final and best metrics. ``progress``: a
    bar counts the rounds of each run that trains (a notebook with a frontend: its ``interactive``)."""
    rows, histories, started = [], [], time.perf_counter()
    for n, experiment in enumerate(experiments, 1):
        begin = time.perf_counter()
        frame, cached = run_cached(experiment, runs_dir, device=device,
                                   on_round=on_round(experiment) if on_round else None, progress=progress)
        row = summarise(frame, experiment)
        row["folder"] = str(experiment.folder(runs_dir))
        row["data_source"] = _data_source(experiment.folder(runs_dir))
        rows.append(row)
        histories.append(frame.assign(name=experiment.name, seed=experiment.cfg.seed))
        if log:
            metric = headline(experiment.cfg)
            took = "cached" if cached else f"{time.perf_counter() - begin:.0f} s"
            print(f"[{n}/{len(experiments)}] {experiment.data.name} {experiment.name}: "
                  f"{metric.replace('_', ' ')} {row.get('final_' + metric, float('nan')):.2f} ({took})", flush=True)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return Results(pd.DataFrame(rows), history, list(experiments), time.perf_counter() - started)


def _data_source(folder: Path) -> str:
    try:
        return json.loads((folder / "run.json").read_text())["data"]["source"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def summarise(frame: pd.DataFrame, experiment: Experiment) -> dict[str, Any]:
    """Final-round and best-round test metrics of one run (best = on the test set, as published)."""
    cfg = experiment.cfg
    row: dict[str, Any] = {"name": experiment.name, **experiment.labels, "control": cfg.control, "seed": cfg.seed}
    test = frame[frame["split"] == "test"]
    metric = headline(cfg)
    if test.empty:
        return row
    last = test[test["round"] == test["round"].max()]
    row.update({f"final_{m}": v for m, v in zip(last["metric"], last["value"])})
    curve = test[test["metric"] == metric].set_index("round")["value"]
    best_round = int(curve.idxmin() if metric.endswith("perplexity") else curve.idxmax())
    best = test[test["round"] == best_round]
    row.update({f"best_{m}": v for m, v in zip(best["metric"], best["value"])})
    row["best_round"] = best_round
    row["rounds"] = cfg.rounds
    return row


# ----------------------------------------------------------------------------- the grids

def _mixture_points(points: Iterable[int]) -> list[int]:
    """``points`` sorted and checked: each i of a mixture x{i}-y{10-i} is in 1..9."""
    points = sorted(set(int(i) for i in points))
    if any(not 1 <= i <= 9 for i in points):
        raise ValueError(f"interpolation points are i in 1..9 (mixture x{{i}}-y{{10-i}}), got {points}")
    return points


def interpolation_modes(global_levels: Iterable[str], points: Iterable[int], other_levels: Iterable[str] | None = None,
                        small_ends: bool = False,
                        panel_points: Mapping[str, Iterable[int]] | None = None) -> list[dict[str, Any]]:
    """The spec's interpolation grid: per global level x, x alone and x{i}-y{10-i} for each smaller y.

    ``points``: the i of every panel; ``panel_points``: a panel's own i instead (``{"a": [1, 3, 5, 7, 9]}``;
    a level not in ``global_levels`` draws no panel). ``other_levels`` keeps only those y (default: every
    smaller level); ``small_ends`` adds each line's other end, y alone (``i`` 0). Returns rows with
    ``global_level``, ``other_level`` (None for x alone), ``i`` (10 for x alone, 0 for y alone) and ``mode``;
    a run shared by several panels (e alone) appears in each.
    """
    points = _mixture_points(points)
    own = {x: _mixture_points(i) for x, i in (panel_points or {}).items()}
    if unknown := [x for x in own if x not in LEVELS[:-1]]:
        raise ValueError(f"panel_points names panels {unknown}; a panel is one of {', '.join(LEVELS[:-1])}")
    others = None if other_levels is None else list(other_levels)
    if others is not None and (unknown := [y for y in others if y not in LEVELS]):
        raise ValueError(f"other levels must be among {', '.join(LEVELS)}, got {unknown}")
    rows = []
    for x in global_levels:
        if x not in LEVELS or x == LEVELS[-1]:
            raise ValueError(f"a panel's global level must be one of {', '.join(LEVELS[:-1])}, got {x!r}")
        rows.append({"global_level": x, "other_level": None, "i": 10, "mode": f"{x}1"})
        for y in LEVELS[LEVELS.index(x) + 1:]:
            if others is not None and y not in others:
                continue
            if small_ends:
                rows.append({"global_level": x, "other_level": y, "i": 0, "mode": f"{y}1"})
            rows += [{"global_level": x, "other_level": y, "i": i, "mode": f"{x}{i}-{y}{10 - i}"}
                     for i in own.get(x, points)]
    return rows


def size_of(model: str, mode: str, vocab_size: int = DEFAULT_VOCAB_SIZE,
            resnet_blocks: tuple[int, ...] = (1, 1, 1, 2)) -> dict[str, float]:
    """Mean parameters, FLOPs and MB of a mixture (its last row in :func:`mixture_sizes`)."""
    row = mixture_sizes(model, mode, vocab_size=vocab_size, resnet_blocks=tuple(resnet_blocks))[-1]
    return {"params": row.params, "flops": row.flops, "mb": row.mb, "ratio": row.ratio}


def interpolation_experiments(data: DataSpec, scale: Scale, global_levels: Iterable[str], points: Iterable[int],
                              curve_points: Iterable[int] = (), curve_eval_every: int | None = None,
                              vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0,
                              other_levels: Iterable[str] | None = None, small_ends: bool = False,
                              seeds: Sequence[int] | None = None,
                              panel_points: Mapping[str, Iterable[int]] | None = None) -> list[Experiment]:
    """The runs of an interpolation grid (iid, fix): each distinct mode of :func:`interpolation_modes` once per
    seed (``seeds``, default ``[seed]``). Under the first seed, x alone and the mixtures with i in
    ``curve_points`` of the widest panel are tested every ``curve_eval_every`` rounds for learning curves."""
    rows = interpolation_modes(global_levels, points, other_levels, small_ends, panel_points)
    widest = rows[0]["global_level"] if rows else None
    curve_points = set(curve_points)
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["mode"], row)
    experiments = []
    for n, run_seed in enumerate(seeds if seeds is not None else [seed]):
        for mode, row in first.items():
            overrides: dict[str, Any] = {"seed": run_seed}
            curve = n == 0 and row["global_level"] == widest and (row["other_level"] is None or row["i"] in curve_points)
            if curve and curve_eval_every:
                overrides["eval_every"] = curve_eval_every
            cfg = scale.config(data.name, scale.control(mode), **overrides)
            sizes = size_of(cfg.model, mode, vocab_size, cfg.resnet_blocks)
            experiments.append(Experiment(mode, cfg, data, {**row, **sizes, "curve": curve, "seed": run_seed}))
    return experiments


def interpolation_points(layout: Sequence[dict[str, Any]], summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """What an interpolation figure plots, one row per point of ``layout`` (:func:`interpolation_modes`):
    ``panel``, ``line`` (the smaller level y; None for x alone), ``mix``, ``share_big`` (share of users at the
    panel's level x), ``mean_size`` (mean parameters), and the final ``metric`` over the seeds: ``mean``,
    ``low``, ``high`` (the range), ``seeds`` and ``values``."""
    column = f"final_{metric}"
    runs = summary.dropna(subset=[column])
    by_mode = {mode: group.sort_values("seed") for mode, group in runs.groupby("name")}
    rows = []
    for row in layout:
        runs_of = by_mode.get(row["mode"])
        if runs_of is None:
            continue
        values = [float(v) for v in runs_of[column]]
        rows.append({"panel": row["global_level"], "line": row["other_level"], "mix": row["mode"],
                     "share_big": row["i"] / 10, "mean_size": float(runs_of["params"].iloc[0]),
                     "mean": sum(values) / len(values), "low": min(values), "high": max(values),
                     "seeds": [int(s) for s in runs_of["seed"]], "values": values})
    return pd.DataFrame(rows)


def trend_shown(points: pd.DataFrame, lower_is_better: bool = False, min_seeds: int = 3) -> dict[str, bool]:
    """Per panel: does the federation of only its level x beat the one of only the smallest level drawn in
    it beyond their spread (the all-big point's worst seed better than the all-small point's best), each
    from at least ``min_seeds`` seeds (fewer show no spread, so they show no trend)?"""
    shown = {}
    for panel, rows in points.groupby("panel", sort=False):
        big = rows[rows["share_big"] == 1]
        ends = rows[rows["share_big"] == 0]
        if big.empty or ends.empty:
            continue
        small = ends.loc[ends["line"].map(LEVELS.index).idxmax()]
        big = big.iloc[0]
        beyond = big["high"] < small["low"] if lower_is_better else big["low"] > small["high"]
        shown[panel] = bool(beyond) and min(len(big["seeds"]), len(small["seeds"])) >= min_seeds
    return shown


# ----------------------------------------------------------------------------- the interpolation notebooks (06-08)

def _share_words(share: int, total: int, first: bool) -> str:
    part = Fraction(share, total)
    if part == 1:
        return "all users" if first else "all"
    if part == Fraction(1, 2):
        return "half of the users" if first else "half"
    return f"{part.numerator} in {part.denominator}" + (" users" if first else "")


def width_words(level: str) -> str:
    """A level's width in words: 'the full width' (a), '1/16 of the full width' (e)."""
    rate = Fraction(LEVEL_RATES[level]).limit_denominator(1024)
    return "the full width" if rate == 1 else f"{rate} of the full width"


def describe_mode(mode: str, model_split: str = "fix") -> str:
    """A model mode in words, e.g. ``c5-e5``: "Half of the users train level c (1/4 of the full width)
    and half level e (1/16 of the full width). ..." (the global model, and what ``fix``/``dynamic`` mean)."""
    levels = parse_model_mode(mode, shorthand=True)
    total = sum(share for _, share in levels)
    parts = [f"{_share_words(share, total, n == 0)}{' train' if n == 0 else ''} level {level} ({width_words(level)})"
             for n, (level, share) in enumerate(levels)]
    said = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    top = levels[0][0]
    global_model = (f"The global model is level {top} ({width_words(top)}), the widest in the mode"
                    + ("" if len(levels) == 1 else "; a narrower client trains its top-left corner"))
    how = {"fix": "Each user keeps its level for the whole run (fix)",
           "dynamic": "Every round each user's level is drawn anew with these proportions (dynamic)"}
    if model_split not in how:
        raise ValueError(f"unknown model split {model_split!r}; valid: {', '.join(how)}")
    return f"{said[0].upper()}{said[1:]}. {global_model}. {how[model_split]}."


def unigram_references(train: torch.Tensor, test: torch.Tensor, vocab_size: int,
                       mask_rate: float = 0.15) -> dict[str, float]:
    """Perplexities on ``test`` reached with word frequencies alone (counted in ``train``, plus one each, so an
    unseen word keeps a chance): ``unigram`` guesses every position by frequency, exp(H); ``copy_unigram``
    copies the visible tokens and guesses the masked ones (a share ``mask_rate``) by frequency, exp(rate·H);
    ``copy_uniform`` copies and guesses the masked ones uniformly, V^rate."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    cross_entropy = float(-(counts / counts.sum())[test].log().mean())  # H, nats per token
    return {"unigram": math.exp(cross_entropy), "copy_unigram": math.exp(mask_rate * cross_entropy),
            "copy_uniform": vocab_size ** mask_rate}


# A level alone, iid, global accuracy, as the paper gives it (spec section 8): drawn beside ours.
PAPER_ALONE = {
    "MNIST": ({"a": 99.5, "b": 99.5, "c": 99.4, "d": 99.2}, "paper (read off its figure; 200 rounds)"),
    "CIFAR10": ({"a": 91.19, "b": 89.82, "c": 87.55, "d": 84.21, "e": 77.09}, "paper (its table; 400 rounds)"),
}


class InterpolationStudy:
    """One dataset's interpolation experiment at a notebook's settings (notebooks 06-08): the grid of mixtures
    x{i}-y{10-i} with each line's ends, every run under each seed, the run watched live, the interpolation
    figure and the learning curves with their records, and the checks every such notebook ends with. Each step
    is one method; :meth:`run_everything` does all.

    ``settings`` is the notebook's :func:`heterofl_core.profiles.settings` (``scale``, ``global_levels``,
    ``points``, optional ``panel_points`` (a panel's own points), ``other_levels``, ``seeds``,
    ``curve_eval_every``, ``featured_mode``); ``paths`` is
    :func:`notebook_paths`. ``seed`` is used when the settings name no ``seeds``.
    """

    def __init__(self, dataset: str, settings: Any, paths: tuple[Path, Path, Path], seed: int = 0) -> None:
        data_root, self.runs_dir, self.figures_dir = paths
        self.dataset, self.settings, self.profile = dataset, settings, settings.profile
        self.scale: Scale = settings.scale
        self.seeds = list(settings.get("seeds") or [seed])
        self.data = DataSpec(dataset, str(data_root), self.scale.train_samples, self.scale.test_samples, seed=seed)
        self.family = dataset_family(dataset)
        self.metric = headline(dataset)
        self.lower_is_better = self.metric.endswith("perplexity")
        loaded = self.data.load()
        self.vocab_size = loaded.vocab_size if isinstance(loaded, TextData) else 0
        paper_dataset = self.family.paper_dataset
        copy = " (offline JPEG copy)" if "JPEG" in loaded.source else ""
        self.title = f"{paper_dataset}{copy} {self.family.display}" + (
            f" run on {dataset}" if dataset != paper_dataset else "")
        self.reductions = self.scale.reductions(dataset) + [f"{len(self.seeds)} seed{'s' * (len(self.seeds) > 1)} "
                                                            f"per point ({', '.join(map(str, self.seeds))}; paper: 1)"]
        self.layout = interpolation_modes(settings.global_levels, settings.points, settings.get("other_levels"),
                                          small_ends=True, panel_points=settings.get("panel_points"))
        grid = interpolation_experiments(self.data, self.scale, settings.global_levels, settings.points,
                                         curve_points=[5], curve_eval_every=settings.curve_eval_every,
                                         vocab_size=self.vocab_size, other_levels=settings.get("other_levels"),
                                         small_ends=True, seeds=self.seeds, panel_points=settings.get("panel_points"))
        featured = (settings.featured_mode, self.seeds[0])
        self.grid = [self._curve(e) if (e.name, e.cfg.seed) == featured else e for e in grid]
        self.featured = next((e for e in self.grid if (e.name, e.cfg.seed) == featured), None) or self._curve(
            Experiment(settings.featured_mode, self.scale.config(dataset, self.scale.control(settings.featured_mode),
                                                                  seed=self.seeds[0]), self.data, {"curve": True}))
        self.results: Results | None = None
        self.saved: list[Path] = []

    def _curve(self, experiment: Experiment) -> Experiment:
        """``experiment`` tested every ``curve_eval_every`` rounds (a run drawn as a learning curve)."""
        every = min(self.settings.curve_eval_every, experiment.cfg.rounds)
        return replace(experiment, cfg=experiment.cfg.replace(eval_every=every),
                       labels={**experiment.labels, "curve": True})

    def about(self) -> str:
        """The data, what the profile cut from the paper's settings, and the grid, in a few lines."""
        vocab = f" | vocabulary {self.vocab_size:,} words" if self.vocab_size else ""
        cut = ["Reduced from the paper's settings:", *[f"  - {r}" for r in self.reductions]]
        modes = list(dict.fromkeys(e.name for e in self.grid))
        return "\n".join([f"{self.dataset} | {self.data.describe()}{vocab}", *cut,
                          f"grid: {len(modes)} mixtures x {len(self.seeds)} seeds = {len(self.grid)} runs: "
                          f"{', '.join(modes)}"])

    def watch(self, interactive: bool = False) -> Results:
        """Train (or read back) the featured run; interactive, its curves redraw every round (a run read back:
        its last round), else they are drawn once at the end."""
        from . import plots

        live = plots.LiveCurves(self.metric, f"{self.dataset} {self.featured.name}", interactive)
        results = run_all([self.featured], self.runs_dir, on_round=lambda experiment: live, progress=interactive)
        if not live.interactive:
            plots.learning_curves(results.history, self.metric, f"{self.dataset}: {self.featured.cfg.control}")
        return results

    def run(self, progress: bool = False) -> Results:
        """Every run of the grid, one line each: finished runs are read back, the others train now (``progress``:
        with a bar over each one's rounds)."""
        self.results = run_all(self.grid, self.runs_dir, progress=progress)
        return self.results

    def points(self) -> pd.DataFrame:
        """The figure's points (:func:`interpolation_points`): per panel and mixture, mean and range over seeds."""
        return interpolation_points(self.layout, self._results().summary, self.metric)

    def table(self) -> pd.DataFrame:
        """One row per mixture: mean parameters, and the final global and local metric, mean over the seeds
        (``low``/``high``: the range of the global one)."""
        kind = self.metric.split("_", 1)[1]
        summary = self._results().summary
        columns = [f"final_global_{kind}", f"final_local_{kind}"]
        table = summary.groupby("name", sort=False).agg(params=("params", "first"), seeds=("seed", "count"),
                                                        **{c: (c, "mean") for c in columns},
                                                        low=(columns[0], "min"), high=(columns[0], "max"))
        return table.reset_index().round(2)

    def result_table(self, paper: dict[str, float] | None = None, paper_label: str = "paper") -> pd.DataFrame:
        """Every mixture of the grid, widest first: mean parameters, ours (the final round's global metric: mean
        and range over the seeds, labelled with the profile) and the paper's number beside it where ``paper``
        has one (a level alone, keyed by level as in :data:`PAPER_ALONE`)."""
        by_mode = {f"{level}1": value for level, value in (paper or {}).items()}
        kind = self.metric.split("_", 1)[1]
        table = self.table()
        table = table.assign(level=table["name"].str[0].map(LEVELS.index)).sort_values(["level", "params"],
                                                                                      ascending=[True, False])
        ours = f"ours ({self.profile}, mean of {len(self.seeds)} seed{'s' * (len(self.seeds) > 1)})"
        return pd.DataFrame({
            "model": table["name"], "mean params": table["params"].map(human),
            ours: table[f"final_global_{kind}"].map(lambda v: f"{v:.2f}"),
            "ours: range": [f"{low:.2f}-{high:.2f}" for low, high in zip(table["low"], table["high"])],
            paper_label: table["name"].map(lambda mode: f"{by_mode[mode]:.2f}" if mode in by_mode else "-"),
        }).reset_index(drop=True)

    def reference(self) -> tuple[float, str]:
        """The level a model must beat: for classes, chance (always guessing the most frequent test class:
        :func:`~heterofl_core.evaluation.global_chance`); for text, the unigram perplexity (word frequencies of
        the whole training split, scored on the test tokens used here)."""
        loaded = self.data.load()
        if isinstance(loaded, TextData):
            train = DataSpec(self.dataset, self.data.root).load().train
            return unigram_references(train, loaded.test, loaded.vocab_size)["unigram"], "unigram (word frequencies)"
        return global_chance(loaded.test_y), "chance"

    def draw(self, allow_mixed: bool = False) -> list[Path]:
        """The interpolation figure and the learning curves, each saved (PNG, PDF, JSON record); the paths.
        Runs trained with different result-making code are refused unless ``allow_mixed``."""
        from . import plots

        results, kind = self._results(), self.metric.split("_", 1)[1]
        trained_with = results.trained_with(allow_mixed)
        points = self.points()
        shown = trend_shown(points, self.lower_is_better)
        paper_rounds = paper_preset(self.dataset)["rounds"]
        rounds = self.scale.rounds or paper_rounds
        converged = bool(shown) and all(shown.values())
        title = f"{self.title}: interpolating between levels (iid, fix)"
        if not converged:
            title += f"; not converged: {rounds} of {paper_rounds} rounds"
        banner = self.scale.banner(self.profile, self.dataset, len(self.seeds), self.settings.global_levels)
        paper_values, paper_label = PAPER_ALONE.get(self.dataset, ({}, ""))
        reference = self.reference()
        panel_points = {x: sorted({row["i"] for row in self.layout if row["global_level"] == x and 0 < row["i"] < 10})
                        for x in dict.fromkeys(row["global_level"] for row in self.layout)}
        panels_of: dict[tuple[int, ...], list[str]] = {}  # panels with the same points, said once
        for x, i in panel_points.items():
            panels_of.setdefault(tuple(i), []).append(x)
        said = "; ".join(f"{', '.join(map(str, i))} (panel{'s' * (len(xs) > 1)} {', '.join(xs)})"
                         for i, xs in panels_of.items())
        note = figure_note(self.profile, self.reductions, results.data_sources(),
                           f"y: global {kind} of the final round, mean over seeds {self.seeds}, bars: their range; "
                           f"each line, left to right: y alone, x{{i}}-y{{10-i}} for i = {said}, x alone; markers "
                           f"are the measured points, the dotted line only joins them (nothing was measured between); "
                           f"the smallest level alone is the same runs in every panel (grey square, dashed line); "
                           f"top axis: share of users at level x; a reference far off the data is written at the "
                           f"panel's edge with its value")
        fig = plots.interpolation_figure(points, self.metric, title, banner, paper=paper_values,
                                         paper_label=paper_label, reference=reference if not converged or
                                         self.lower_is_better else None)
        meta = plots.record(self.profile, title, caption=" | ".join(note), data_source=results.data_sources(),
                            configs=results.configs(), reductions=self.reductions, dataset=self.dataset,
                            banner=banner, trained_with=trained_with, trend_shown=shown,
                            reference={"label": reference[1], "value": reference[0]},
                            paper={"label": paper_label, "values": paper_values}, panel_points=panel_points,
                            points=points.to_dict("records"))
        saved = plots.save_figure(fig, self.figures_dir, f"interpolation_{self.dataset}", meta)

        curves = results.summary[results.summary["curve"].astype(bool)]
        wanted = set(zip(curves["name"], curves["seed"]))
        history = results.history[[key in wanted for key in zip(results.history["name"], results.history["seed"])]]
        title = f"{self.title}: learning curves (seed {self.seeds[0]})"
        reductions = replace(self.scale, eval_every=self.settings.curve_eval_every).reductions(self.dataset)
        note = figure_note(self.profile, reductions, results.data_sources())
        banner = self.scale.banner(self.profile, self.dataset, 1)
        fig = plots.learning_curves(history, self.metric, title, banner, names=list(curves["name"]))
        meta = plots.record(self.profile, title, caption=" | ".join(note), data_source=results.data_sources(),
                            configs=[c for c in results.configs() if (c["name"], c["seed"]) in wanted],
                            reductions=reductions, dataset=self.dataset, banner=banner, trained_with=trained_with)
        self.saved = saved + plots.save_figure(fig, self.figures_dir, f"curves_{self.dataset}", meta)
        return self.saved

    def run_everything(self, interactive: bool = False) -> Results:
        """:meth:`watch`, :meth:`run` and :meth:`draw`: the whole recipe of notebook 06 in one call."""
        self.watch(interactive)
        self.run(progress=interactive)
        self.draw()
        return self._results()

    def check(self) -> None:
        """What every interpolation notebook checks (AssertionError saying which failed): each run finished and
        was tested, the figures and their records are written, wider global models and more x clients mean
        more parameters."""
        summary = self._results().summary
        values = summary[f"final_{self.metric}"]
        assert len(summary) == len(self.grid) and values.notna().all(), "every run of the grid finished and was tested"
        assert self.saved and all(p.exists() for p in self.saved), "figures and their records are written"
        points = self.points()
        alone = points[points["share_big"] == 1].drop_duplicates("panel").set_index("panel")["mean_size"]
        assert list(alone) == sorted(alone, reverse=True), "wider global models have more parameters"
        for _, line in points.dropna(subset=["line"]).groupby(["panel", "line"]):
            assert line.sort_values("share_big")["mean_size"].is_monotonic_increasing, "more x clients, more parameters"

    def _results(self) -> Results:
        if self.results is None:
            raise RuntimeError("run the grid first: study.run() (or study.run_everything())")
        return self.results


# The paper's CIFAR10 table (spec section 8): ResNet18 [1, 1, 1, 2]; single levels fix, combinations dynamic.
PAPER_CIFAR10_TABLE = pd.DataFrame(
    [("a", 1.00, "9.6M", "330.2M", 36.71, 91.19, 92.38, 56.88),
     ("a-e", 0.50, "4.8M", "165.9M", 18.43, 90.29, 92.10, 59.11),
     ("a-b-c-d-e", 0.27, "2.6M", "88.4M", 9.78, 88.83, 92.49, 61.64),
     ("b", 1.00, "2.4M", "83.3M", 9.19, 89.82, 93.83, 55.45),
     ("b-e", 0.51, "1.2M", "42.4M", 4.67, 89.10, 90.68, 59.81),
     ("b-c-d-e", 0.33, "801K", "27.9M", 3.05, 87.92, 91.90, 59.10),
     ("c", 1.00, "604K", "21.2M", 2.30, 87.55, 91.09, 55.12),
     ("c-e", 0.53, "321K", "11.3M", 1.22, 86.88, 91.83, 63.47),
     ("c-d-e", 0.44, "265K", "9.4M", 1.01, 85.79, 91.49, 55.42),
     ("d", 1.00, "152K", "5.5M", 0.58, 84.21, 90.77, 61.13),
     ("d-e", 0.63, "95K", "3.5M", 0.36, 82.93, 90.89, 56.16),
     ("e", 1.00, "38K", "1.5M", 0.15, 77.09, 89.62, 54.16)],
    columns=["model", "ratio", "params", "FLOPs", "MB", "IID acc", "non-IID local", "non-IID global"])
# The comparison rows the paper prints under it (Liang et al., 2020), as printed.
PAPER_CIFAR10_COMPARISONS = pd.DataFrame(
    [("Standalone (Liang et al., 2020)", 1.00, "1.8M", "3.6M", 6.88, 16.90, 87.93, 10.03),
     ("FedAvg (Liang et al., 2020)", 1.00, "1.8M", "3.6M", 6.88, 67.74, 58.99, 58.99),
     ("LG-FedAvg (Liang et al., 2020)", 1.00, "1.8M", "3.6M", 6.88, 69.76, 91.77, 60.79)],
    columns=PAPER_CIFAR10_TABLE.columns)


def table_experiments(data: DataSpec, scale: Scale, models: Iterable[str] = tuple(PAPER_CIFAR10_TABLE["model"]),
                      splits: Iterable[str] = ("iid", "non-iid-2"), seed: int = 0) -> list[Experiment]:
    """The runs behind the CIFAR10 table, as the authors' scripts run them: a single level (``c``) with the
    fix split, a combination (``a-e``, ``a-b-c-d-e``) with dynamic (every round each user draws its level)."""
    experiments = []
    for split in splits:
        for model in models:
            mode = "-".join(f"{level}1" for level in model.split("-"))
            model_split = "fix" if "-" not in model else "dynamic"
            cfg = scale.config(data.name, scale.control(mode, split=split, model_split=model_split), seed=seed)
            experiments.append(Experiment(f"{model} {split}", cfg, data, {"model": model, "data_split": split}))
    return experiments


# The ablation (spec section 8, the paper's ablation table): non-IID-2, model a-e, dynamic.
ABLATION_VARIANTS = [  # (label, norm, scale, mask)
    ("sBN", "bn", False, False),
    ("sBN + masked CE", "bn", False, True),
    ("sBN + Scaler", "bn", True, False),
    ("sBN + Scaler + masked CE", "bn", True, True),
    ("no norm + masked CE", "none", False, True),  # with the next row: the Scaler where no norm follows it
    ("no norm + Scaler + masked CE", "none", True, True),
    ("InstanceNorm + Scaler + masked CE", "in", True, True),
    ("GroupNorm + Scaler + masked CE", "gn", True, True),
    ("LayerNorm + Scaler + masked CE", "ln", True, True),
]
PAPER_ABLATION = {  # (dataset, variant) -> (local, global) accuracy: the a-e rows of the spec's table (dynamic)
    ("MNIST", "sBN"): (99.2, 99.2),
    ("MNIST", "sBN + masked CE"): (99.8, 98.0),
    ("MNIST", "sBN + Scaler"): (99.3, 99.3),
    ("MNIST", "sBN + Scaler + masked CE"): (99.8, 98.2),
    ("MNIST", "no norm + masked CE"): (99.4, 95.7),
    ("MNIST", "no norm + Scaler + masked CE"): (99.5, 95.8),
    ("MNIST", "InstanceNorm + Scaler + masked CE"): (99.8, 98.7),
    ("MNIST", "GroupNorm + Scaler + masked CE"): (99.5, 96.2),
    ("MNIST", "LayerNorm + Scaler + masked CE"): (99.5, 96.2),
    ("CIFAR10", "sBN"): (41.0, 41.3),
    ("CIFAR10", "sBN + masked CE"): (90.7, 57.7),
    ("CIFAR10", "sBN + Scaler"): (46.0, 46.7),
    ("CIFAR10", "sBN + Scaler + masked CE"): (92.8, 60.4),
    ("CIFAR10", "no norm + masked CE"): (89.1, 52.8),
    ("CIFAR10", "no norm + Scaler + masked CE"): (90.3, 55.6),
    ("CIFAR10", "InstanceNorm + Scaler + masked CE"): (87.0, 34.4),
    ("CIFAR10", "GroupNorm + Scaler + masked CE"): (88.7, 49.7),
    ("CIFAR10", "LayerNorm + Scaler + masked CE"): (78.5, 25.0),
}


def ablation_experiments(data: DataSpec, scale: Scale, mode: str = "a1-e1", split: str = "non-iid-2",
                         variants: Iterable[str] | None = None, seed: int = 0,
                         model_split: str = "dynamic") -> list[Experiment]:
    """One run per ablation variant (by label; ``None`` = all of :data:`ABLATION_VARIANTS`).
    ``model_split`` defaults to the paper's for its mixture a-e: every round each user draws its level."""
    wanted = None if variants is None else list(variants)
    known = [label for label, *_ in ABLATION_VARIANTS]
    if wanted is not None and (unknown := [v for v in wanted if v not in known]):
        raise ValueError(f"unknown ablation variants {unknown}; valid: {known}")
    experiments = []
    for label, norm, scaler, mask in ABLATION_VARIANTS:
        if wanted is not None and label not in wanted:
            continue
        control = scale.control(mode, split=split, model_split=model_split, norm=norm, scale=scaler, mask=mask)
        cfg = scale.config(data.name, control, seed=seed)
        experiments.append(Experiment(label, cfg, data, {"variant": label, "norm": norm, "scaler": scaler,
                                                         "masked_ce": mask}))
    return experiments


def extraction_experiments(data: DataSpec, scale: Scale, mode: str = "a1-e9",
                           model_splits: Iterable[str] = ("fix", "dynamic"),
                           strategies: Iterable[str] = EXTRACTIONS, seeds: Iterable[int] = (0,)) -> list[Experiment]:
    """One run per (model split, extraction strategy, seed) of one mixture on iid data (notebook 12)."""
    strategies = list(strategies)
    if unknown := [s for s in strategies if s not in EXTRACTIONS]:
        raise ValueError(f"unknown extraction strategies {unknown}; valid: {', '.join(EXTRACTIONS)}")
    return [Experiment(f"{split} {strategy} seed {seed}",
                       scale.config(data.name, scale.control(mode, model_split=split), extraction=strategy, seed=seed),
                       data, {"model_split": split, "extraction": strategy, "seed": seed})
            for split in model_splits for strategy in strategies for seed in seeds]


def baseline_experiments(data: DataSpec, scale: Scale, mode: str = "a1-e9", seeds: Sequence[int] = (0,),
                         model_split: str = "fix") -> list[Experiment]:
    """HeteroFL on a mixture beside the FedAvg runs the same users, data and budget allow (notebook 05):
    HeteroFL; FedAvg at the global level with only the clients that can hold it (the others sit out:
    ``participants=widest``); FedAvg at the smallest level (the mode's last) with every client; and, as an
    upper reference no real federation of these clients reaches, FedAvg at the global level with every client.
    Single-level runs use the ``fix`` split (every user has the one level either way)."""
    levels = parse_model_mode(mode, shorthand=True)
    if len(levels) < 2:
        raise ValueError(f"baselines compare a mixture of levels with its widest and smallest level; got the "
                         f"single level {format_model_mode(levels)}: use e.g. a1-e9")
    mode, top, small = format_model_mode(levels), levels[0][0], levels[-1][0]
    mixed = "-".join(level for level, _ in levels)
    runs = [  # (name, mode, model split, participants, labels)
        (f"HeteroFL {mode}", mode, model_split, "all",
         dict(method="HeteroFL", width=mixed, trains="every client, at its own level", reachable=True)),
        (f"FedAvg {top}, only clients that hold it", mode, model_split, "widest",
         dict(method="FedAvg", width=top, trains=f"only the clients at level {top}; the others sit out",
              reachable=True)),
        (f"FedAvg {small}, every client", f"{small}1", "fix", "all",
         dict(method="FedAvg", width=small, trains="every client", reachable=True)),
        (f"FedAvg {top}, every client (upper reference)", f"{top}1", "fix", "all",
         dict(method="FedAvg", width=top, trains="every client, even those that cannot hold it", reachable=False)),
    ]
    return [Experiment(name, scale.config(data.name, scale.control(run_mode, model_split=split), seed=seed,
                                          participants=participants),
                       data, {**labels, "mode": run_mode, "participants": participants, "seed": seed})
            for seed in seeds for name, run_mode, split, participants, labels in runs]
