"""What decides a cached run's result, and the cache: an :class:`Experiment` is a config and
its data (:class:`DataSpec`: a dataset, optionally a seeded subset), run at most once into

    <runs>/<dataset>/<control>-<key>/     key = hash of (config, data subset, results version)

so a finished run is read back without training, an interrupted one continues from its
checkpoint, and a changed config, subset or result-making code gets a folder of its own.

This module makes results (it cuts the data); experiments.py, which builds the notebooks'
grids of experiments and presents them, does not: a grid only chooses configs, which the key holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .config import ExperimentConfig
from .data import ImageData, TextData
from .datasets import get_dataset, load_dataset
from .federated import RoundCallback, run_experiment
from .runs import read_metrics, results_version


@dataclass(frozen=True)
class DataSpec:
    """A dataset at a data root, optionally cut to a subset (``None`` = all of it).

    Images: ``train``/``test`` random samples (seeded, the same for every run).
    Text: the first ``train``/``test`` tokens of the streams (text must stay contiguous).
    """

    name: str
    root: str
    train: int | None = None
    test: int | None = None
    seed: int = 0

    def describe(self) -> str:
        if self.train is None and self.test is None:
            return "whole dataset"
        unit = "tokens" if get_dataset(self.name, self.root).kind == "text" else "samples"
        part = lambda n, split: f"all {split}" if n is None else f"{n:,} {split}"  # noqa: E731
        return f"subset: {part(self.train, 'train')} / {part(self.test, 'test')} {unit}"

    def load(self) -> ImageData | TextData:
        """The data (loaded once per process and spec)."""
        return _load(self)


@lru_cache(maxsize=8)
def _load(spec: DataSpec) -> ImageData | TextData:
    data = load_dataset(spec.name, spec.root, download=False)
    return subset(data, spec.train, spec.test, spec.seed)


def subset(data: ImageData | TextData, train: int | None, test: int | None, seed: int = 0) -> ImageData | TextData:
    """A smaller copy of ``data``; its ``source`` says what was kept."""
    if train is None and test is None:
        return data
    if isinstance(data, TextData):
        kept = replace(data, train=data.train[:train], test=data.test[:test])
        what = f"first {kept.train.numel():,} train / {kept.test.numel():,} test tokens"
    else:
        generator = torch.Generator().manual_seed(seed)
        pick_train = torch.randperm(len(data.train_y), generator=generator)[:train]
        pick_test = torch.randperm(len(data.test_y), generator=generator)[:test]
        kept = replace(data, train_x=data.train_x[pick_train], train_y=data.train_y[pick_train],
                       test_x=data.test_x[pick_test], test_y=data.test_y[pick_test])
        what = f"random {len(kept.train_y):,} train / {len(kept.test_y):,} test images (seed {seed})"
    return replace(kept, source=f"{data.source}; {what}")


@dataclass(frozen=True)
class Experiment:
    """One run: a name for tables, its config, its data, and labels for grouping results."""

    name: str
    cfg: ExperimentConfig
    data: DataSpec
    labels: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """Hash of everything that determines the result: config, data subset and the code that makes
        results (:func:`~heterofl_core.runs.results_version`), so a change of that code retrains."""
        text = json.dumps({"config": self.cfg.to_dict(), "data": [self.data.name, self.data.train,
                                                                    self.data.test, self.data.seed],
                           "code": results_version()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def folder(self, runs_dir: str | os.PathLike) -> Path:
        return Path(runs_dir) / self.data.name / f"{self.cfg.control}-{self.key}"


def finished(folder: Path, cfg: ExperimentConfig) -> bool:
    """True when ``folder`` holds a completed run of ``cfg`` (its metrics reach the last round)."""
    try:
        saved = json.loads((folder / "run.json").read_text())["config"]
        rounds = pd.read_csv(folder / "metrics.csv", usecols=["round"])["round"].max()
    except (OSError, ValueError, KeyError):
        return False
    return saved == json.loads(json.dumps(cfg.to_dict())) and rounds == cfg.rounds


def run_cached(experiment: Experiment, runs_dir: str | os.PathLike, *, device: str = "auto",
               on_round: RoundCallback | None = None, progress: bool = False) -> tuple[pd.DataFrame, bool]:
    """(tidy metrics, whether they came from the cache): read a finished run, else run or continue it.
    ``on_round`` sees every round trained now; a run read back shows it its last round once. ``progress``:
    a bar counts the rounds of a run that trains (gone when it ends)."""
    folder = experiment.folder(runs_dir)
    if finished(folder, experiment.cfg):
        frame = read_metrics(folder)
        if on_round is not None:
            on_round(experiment.cfg.rounds, frame)
        return frame, True
    data = experiment.data.load()
    (folder.parent).mkdir(parents=True, exist_ok=True)
    (folder / "experiment.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "experiment.json").write_text(json.dumps(
        {"name": experiment.name, "data": experiment.data.__dict__, "data_source": data.source,
         "labels": experiment.labels}, indent=2, default=str))
    frame = run_experiment(experiment.cfg, data=data, out_dir=folder, device=device, resume=True,
                           quiet=not progress, round_lines=False, on_round=on_round)
    return frame, False
