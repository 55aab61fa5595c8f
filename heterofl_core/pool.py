"""Group work in a room: every table runs one variant or seed and writes a result file; one call pools them.

A result file (``<table>-<name>-seed<seed>.result.json``) holds what one run produced and what made it: the
profile, the code that makes results (``results_version``), the config, the final test metrics and the run's
training cost in client-FLOPs. :func:`pool` reads a room's files into one table, one row per variant with the
mean and the spread over its runs, and refuses files made by other code or at another profile, naming them:
numbers from different code or scale do not average. :func:`challenge` ranks entries under a budget of
client-FLOPs (the workshop's closing challenge).

Client-FLOPs (:func:`client_flops`): over every round, every client that trained, its training samples x its
local epochs x the forward FLOPs of one sample through its sub-model (the authors' counter, as in the size
tables). A forward count, not wall-clock time: the same on every laptop, and it charges a wide client what its
width costs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .config import LEVEL_RATES, ExperimentConfig, level_of
from .runs import read_metrics
from .sizes import level_size

SUFFIX = ".result.json"


class PoolError(ValueError):
    """Result files that cannot be pooled together; the message names them and says why."""


def client_flops(cfg: ExperimentConfig, data: Any) -> float:
    """The training cost of a whole run of ``cfg`` on ``data`` in client-FLOPs (module docstring): its rounds'
    plans drawn as the run draws them (nothing trains), each client that trains charged its training samples x
    local epochs x the forward FLOPs of one sample through its level's sub-model."""
    import torch

    from .families import get_family
    from .federated import Federation
    from .seeds import round_generator

    if get_family(cfg.model).data_kind != "image":
        raise ValueError(f"client-FLOPs count image samples; {cfg.model} trains on {get_family(cfg.model).data_kind}")
    federation = Federation.assemble(cfg, data, torch.device("cpu"))
    flops = {rate: _forward_flops(cfg, rate) for rate in LEVEL_RATES.values()}
    total = 0.0
    for round_ in range(1, cfg.rounds + 1):
        plan = federation.plan_round(round_, round_generator(cfg.seed, round_, federation.device))
        for user, rate in zip(plan.users, plan.rates):
            total += len(federation.workload.split.train[user]) * cfg.local_epochs * flops[rate]
    return total


def _forward_flops(cfg: ExperimentConfig, rate: float) -> float:
    """Forward FLOPs of one sample through a rate-``rate`` sub-model of ``cfg``'s family (authors' counter)."""
    return float(level_size(cfg.model, level_of(rate), resnet_blocks=tuple(cfg.resnet_blocks)).flops)


def write_result(run_folder: str | os.PathLike, room: str | os.PathLike, *, table: str, name: str,
                 profile: str, cost: float) -> Path:
    """Write one run's result file into the ``room`` folder; returns its path. ``name``: the variant (rows of
    the pooled table); ``table``: who ran it; ``cost``: its client-FLOPs (:func:`client_flops`)."""
    folder = Path(run_folder)
    run = json.loads((folder / "run.json").read_text())
    metrics = read_metrics(folder)
    test = metrics[metrics["split"] == "test"]
    last = test[test["round"] == test["round"].max()]
    record = {"table": str(table), "name": name, "profile": profile, "seed": run["config"]["seed"],
              "results_version": run.get("results_version", "unknown"), "code_version": run.get("code_version"),
              "control": run["config"].get("control"), "config": run["config"],
              "data_source": run.get("data", {}).get("source"), "rounds": int(test["round"].max()),
              "metrics": {row.metric: float(row.value) for row in last.itertuples()}, "client_flops": float(cost)}
    path = Path(room) / f"{_safe(table)}-{_safe(name)}-seed{record['seed']}{SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in str(text))


def read_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """The result files among ``paths`` (files, or folders searched for ``*.result.json``), each with its path."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.glob(f"*{SUFFIX}"))
        elif path.is_file():
            found.append(path)
        else:
            raise PoolError(f"{path}: no such file or folder; give result files (*{SUFFIX}) or the folder holding them")
    if not found:
        raise PoolError(f"no result files (*{SUFFIX}) in {', '.join(map(str, paths))}")
    records = []
    for path in found:
        try:
            record = json.loads(path.read_text())
            record["metrics"], record["name"]  # noqa: B018 (a result file has both)
        except (ValueError, KeyError, TypeError) as error:
            raise PoolError(f"{path} is not a result file ({error}); heterofl writes them with write_result") from None
        records.append({**record, "file": path.name})
    return records


def check_compatible(records: Sequence[dict[str, Any]], results: str | None = None) -> None:
    """Refuse results from different code or profiles (the message names the files of each); with
    ``results``, every file must have been made by that results version."""
    for key, what in (("results_version", "code that makes results"), ("profile", "profile")):
        groups: dict[str, list[str]] = {}
        for record in records:
            groups.setdefault(str(record.get(key)), []).append(record["file"])
        if len(groups) > 1:
            listed = "; ".join(f"{value}: {', '.join(files)}" for value, files in groups.items())
            raise PoolError(f"these result files come from different {what} and cannot be pooled: {listed}. "
                            f"Rerun the odd ones with the same code and profile (heterofl --version), or pool them "
                            f"apart")
    if results is not None:
        other = [r["file"] for r in records if r.get("results_version") != results]
        if other:
            raise PoolError(f"made by other code than this installation's (results version {results}): "
                            f"{', '.join(other)}; rerun them here, or pool them with the code that made them")


def pool(paths: Iterable[str | os.PathLike], metric: str = "global_accuracy",
         results: str | None = None) -> pd.DataFrame:
    """One row per variant (``name``) of the room's result files: how many runs, which tables, the mean of
    ``metric`` and its spread (standard deviation, lowest, highest), the mean client-FLOPs. Refuses files from
    different code or profiles (:class:`PoolError`)."""
    records = read_results(paths)
    check_compatible(records, results)
    frame = pd.DataFrame([{"name": r["name"], "table": r["table"], "seed": r["seed"],
                           "value": r["metrics"].get(metric, math.nan), "client_flops": r["client_flops"]}
                          for r in records])
    if frame["value"].isna().all():
        raise PoolError(f"no result file has the metric {metric!r}; they have: {sorted(records[0]['metrics'])}")
    table = frame.groupby("name", sort=False).agg(
        runs=("value", "count"), tables=("table", lambda t: ", ".join(sorted(set(map(str, t))))),
        mean=("value", "mean"), std=("value", "std"), low=("value", "min"), high=("value", "max"),
        client_flops=("client_flops", "mean"))
    return table.sort_values("mean", ascending=_lower_is_better(metric)).rename(columns={"mean": f"{metric} (mean)"})


def challenge(paths: Iterable[str | os.PathLike], budget: float, metric: str = "global_accuracy",
              results: str | None = None) -> pd.DataFrame:
    """The closing challenge's scoreboard: every entry (one result file each) with its ``metric`` and its
    client-FLOPs, ranked best first among those within ``budget``; entries over it are listed, unranked."""
    records = read_results(paths)
    check_compatible(records, results)
    board = pd.DataFrame([{"table": r["table"], "entry": r["name"], "control": r.get("control"), "seed": r["seed"],
                           metric: r["metrics"].get(metric, math.nan), "client_flops": r["client_flops"],
                           "within budget": r["client_flops"] <= budget} for r in records])
    board = board.sort_values(["within budget", metric], ascending=[False, _lower_is_better(metric)]).reset_index(drop=True)
    board.insert(0, "rank", [str(i + 1) if ok else "over budget" for i, ok in enumerate(board["within budget"])])
    return board


def _lower_is_better(metric: str) -> bool:
    return metric.endswith(("perplexity", "loss"))


# ----------------------------------------------------------------------------- the command

def add_command(commands: Any) -> None:
    """Register ``heterofl pool``."""
    parser = commands.add_parser(
        "pool", help="pool a room's result files into one table with spreads (group work)",
        description="Reads result files (*.result.json, written by notebook 13 or pool.write_result) from the given "
                    "files and folders and prints one row per run name: runs, tables, mean and spread of a metric, "
                    "training cost. Refuses files made by other code or at another profile (exit 2). With --budget, "
                    "the challenge's scoreboard instead.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="result files, or folders holding them")
    parser.add_argument("--metric", default="global_accuracy", help="the metric to pool (default global_accuracy)")
    parser.add_argument("--budget", type=float, metavar="FLOPS",
                        help="rank every entry within this many client-FLOPs (the challenge's scoreboard)")
    parser.set_defaults(handler=_cmd_pool)


def _cmd_pool(args: Any) -> int:
    from .runs import results_version

    ours = results_version()
    table = (challenge(args.paths, args.budget, args.metric, ours) if args.budget is not None
             else pool(args.paths, args.metric, ours))
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.round(3).to_string())
    return 0
