"""A run is a folder: resolved config, tidy per-round metrics, final and best checkpoints.

    <out>/run.json        config, data source, code version (and the results version: a hash of
                          the code that makes results), device, versions
    <out>/metrics.csv     round, split, metric, value, elapsed_s (one row per number)
    <out>/checkpoint.pt   the latest round: global state and everything needed to resume
    <out>/best.pt         the round with the best test metric (the published convention:
                          model selection on the test set; labelled as such)

Files are written atomically (temporary file + rename), so an interrupted run
never leaves a half-written checkpoint.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .config import ExperimentConfig

METRIC_COLUMNS = ("round", "split", "metric", "value", "elapsed_s")
BEST_LABEL = "best on the test set (the published convention: model selection on test)"


class RunError(ValueError):
    """A run folder that cannot be used as asked (exists without --resume, other config, ...)."""


def code_version(package: Path = Path(__file__).parent) -> str:
    """``git describe`` of the checkout holding ``package``, else the package version.

    ``-dirty`` when the code that makes results (the package, the notebooks beside it)
    differs from the commit; outputs such as ``figures/`` do not count, so a
    reproduction that writes its figures into the checkout still labels them clean.
    """
    from . import __version__
    try:
        described = _git(package, "describe", "--always", "--tags")
        changed = _git(package, "status", "--porcelain", "--untracked-files=no", "--",
                       str(package), str(package.parent / "notebooks"))
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not described or changed is None:
        return __version__
    return f"{__version__}+{described}{'-dirty' if changed else ''}"


# Every file of the package is one or the other (tests/test_runs.py checks it). Modules that only present, time,
# launch, count or choose configs (which a cached run's key holds anyway): they cannot change a run's numbers.
PRESENTATION_MODULES = frozenset({"__init__.py", "__main__.py", "bench.py", "cli.py", "data_cli.py", "exercises.py",
                                  "experiments.py", "packs.py", "pictures.py", "plots.py", "pool.py", "profiles.py",
                                  "reproduce.py", "sizes.py"})
# ... and the code that makes results: data, splits, models, training, the round, aggregation, the run cache.
RESULT_MODULES = frozenset({"aggregation.py", "cohort.py", "cohort_rule.json", "config.py", "data.py", "datasets.py",
                            "evaluation.py", "extraction.py", "families.py", "federated.py", "image_files.py",
                            "losses.py", "machine.py",
                            "models/__init__.py", "models/conv.py", "models/layers.py", "models/resnet.py",
                            "models/transformer.py", "run_cache.py", "runs.py", "seeds.py", "server.py", "slicing.py",
                            "splits.py", "text_files.py", "training.py", "workloads.py"})


def results_version(package: Path | None = None) -> str:
    """A short hash of the code that makes results: every source file of the package except
    :data:`PRESENTATION_MODULES` (so :data:`RESULT_MODULES`, and a file declared neither way yet).
    Run caches are keyed on it, so a change there retrains.

    Without ``package``: this package, hashed once per process (at first use), so an edit made while a
    reproduction runs does not move its run folders."""
    return _imported_results_version() if package is None else _hash_sources(package)


@functools.lru_cache(maxsize=1)
def _imported_results_version() -> str:
    return _hash_sources(Path(__file__).parent)


def _hash_sources(package: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in package.rglob("*") if p.suffix in (".py", ".json") and p.is_file()
                   and "__pycache__" not in p.parts and str(p.relative_to(package)) not in PRESENTATION_MODULES)
    for path in files:
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _git(cwd: Path, *args: str) -> str | None:
    """A git command's output in ``cwd``, stripped; None when it fails."""
    out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=5)
    return out.stdout.strip() if out.returncode == 0 else None


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class RunState:
    """What a checkpoint holds beyond the model: enough to continue exactly."""

    round: int = 0
    elapsed_s: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_round: int = 0
    best_value: float | None = None


class RunFolder:
    """Reads and writes one run's folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def start(self, cfg: ExperimentConfig, data_name: str, data_source: str, device: str, resume: bool,
              runtime: dict[str, Any] | None = None) -> None:
        """Check the folder can take this run; write run.json (``runtime``: where rounds run, default in-process)."""
        if self.checkpoint.exists() and not resume:
            raise RunError(f"{self.path} already holds a run (checkpoint.pt); pass --resume to continue it, "
                           f"or choose another --out")
        if resume and self.checkpoint.exists():
            self._check_same_config(cfg)
        record = {"config": cfg.to_dict(), "data": {"name": data_name, "source": data_source},
                  "code_version": code_version(), "results_version": results_version(), "device": device,
                  "runtime": runtime or {"engine": "in-process"}, "torch": torch.__version__,
                  "python": platform.python_version(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "best_checkpoint": BEST_LABEL}
        atomic_write(self.path / "run.json", lambda f: f.write(json.dumps(record, indent=2).encode()))

    def _check_same_config(self, cfg: ExperimentConfig) -> None:
        saved = {**ExperimentConfig().to_dict(), **self.load()["config"]}  # fields added since: their defaults
        ours = cfg.to_dict()
        differ = sorted(k for k in set(saved) | set(ours) if k != "rounds" and saved.get(k) != ours.get(k))
        if differ:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {ours.get(k)!r}" for k in differ)
            raise RunError(f"cannot resume {self.checkpoint}: it was made with another config ({detail}); "
                           f"use the same settings (only --rounds may change) or another --out")

    def load(self) -> dict[str, Any]:
        """The latest checkpoint (on CPU)."""
        try:
            return torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        except Exception as error:  # a damaged file must not become a deep traceback
            raise RunError(f"cannot read checkpoint {self.checkpoint}: {error}; delete the folder to start afresh") from None

    def save(self, cfg: ExperimentConfig, state: dict[str, torch.Tensor], run: RunState, best: bool) -> None:
        """Checkpoint this round (and the best one when ``best``), then the metrics CSV."""
        payload = {"config": cfg.to_dict(), "state": {k: v.detach().cpu() for k, v in state.items()},
                   "run": run.__dict__}
        atomic_write(self.checkpoint, lambda f: torch.save(payload, f))
        if best:
            atomic_write(self.path / "best.pt", lambda f: torch.save({**payload, "label": BEST_LABEL}, f))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(run.rows)
        atomic_write(self.path / "metrics.csv", lambda f: f.write(text.getvalue().encode()))


def metrics_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Tidy metrics as a DataFrame with the standard columns."""
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """metrics.csv of a run folder (or the file itself)."""
    path = Path(path)
    return pd.read_csv(path / "metrics.csv" if path.is_dir() else path)
