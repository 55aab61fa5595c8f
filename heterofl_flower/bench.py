"""``heterofl flower bench``: what Flower costs, against the same work in one process.

1. Rounds of MNIST with the paper's settings (``1_100_0.1_iid_fix_a1-e1_bn_1_1``: 10 of
   100 clients, batch 10, 5 local epochs, sBN over the 60,000 training images), run
   in-process (``heterofl run``) and through Flower's simulation on Ray in one run, from the
   same seed: round time by phase, and the ratio of Flower's round to the in-process one.
   Round 1 through Flower also starts Ray's actors and loads each one's data, so the ratio
   is taken on the later rounds (both are reported).
2. Bytes per round per client of each level, to the node and back (the sub-model's
   ``ArrayRecord``), against FedAvg's full model, for every family.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from heterofl_core.config import LEVEL_RATES, parse_control
from heterofl_core.datasets import get_dataset
from heterofl_core.families import build_model
from heterofl_core.federated import run_experiment
from heterofl_core.slicing import Slicer

from .messages import to_record

PAPER_CONTROL = "1_100_0.1_iid_fix_a1-e1_bn_1_1"
FAMILY_OPTIONS = {"conv": {}, "resnet18": {}, "transformer": {"vocab_size": get_dataset("WikiText2").classes}}  # the paper's


def level_bytes() -> dict[str, dict[str, Any]]:
    """Per family and level: a client's sub-model in bytes (sent to the node, and back trained), and its
    share of FedAvg's full model (level a: every client gets all of it)."""
    out: dict[str, dict[str, Any]] = {}
    for family, options in FAMILY_OPTIONS.items():
        slicer = Slicer(lambda rate, family=family, options=options: build_model(family, rate, **options))
        state = {key: torch.zeros(value.shape) for key, value in build_model(family, 1.0, **options).state_dict().items()}
        full = to_record(state).count_bytes()
        out[family] = {level: {"bytes": (size := to_record(slicer.split(state, rate)).count_bytes()),
                               "mb": size / 1e6, "of_fedavg": size / full}
                       for level, rate in LEVEL_RATES.items()}
    return out


def bench_rounds(data_root: str | None, supernodes: int, rounds: int, quick: bool) -> dict[str, Any]:
    """The same rounds in-process and through Flower's simulation: round times by phase and their ratio."""
    from .server_app import FlowerRun
    from .simulation import simulate
    cfg = parse_control(PAPER_CONTROL, "MNIST", rounds=rounds,
                        **({"local_epochs": 1, "sbn_samples": 2000} if quick else {}))
    with tempfile.TemporaryDirectory() as folder:
        in_process = run_experiment(cfg, data_root=data_root, out_dir=Path(folder) / "in-process", quiet=True)
        flower = simulate(FlowerRun(cfg, str(Path(folder) / "flower"), supernodes, data_root=data_root, quiet=True))
    times = {name: _times(frame) for name, frame in (("in_process", in_process), ("flower", flower))}
    warm = [r for r in range(2, rounds + 1)] or [1]
    ratio = sum(times["flower"][r]["round_s"] for r in warm) / sum(times["in_process"][r]["round_s"] for r in warm)
    return {"control": cfg.control, "local_epochs": cfg.local_epochs, "supernodes": supernodes, "rounds": rounds,
            "times_s": times, "ratio_rounds": warm, "flower_over_in_process": ratio,
            "test_metrics_equal": _tested(in_process).equals(_tested(flower))}


def _times(frame: pd.DataFrame) -> dict[int, dict[str, float]]:
    rows = frame[frame["split"] == "time"]
    return {int(r): dict(zip(group["metric"], group["value"])) for r, group in rows.groupby("round")}


def _tested(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["split"] == "test"][["round", "metric", "value"]].reset_index(drop=True)


def format_report(report: dict[str, Any]) -> str:
    """The tables ``heterofl flower bench`` prints."""
    lines = []
    if "rounds" in report:
        r = report["rounds"]
        lines += [f"MNIST {r['control']}, {r['local_epochs']} local epochs, {r['supernodes']} SuperNodes "
                  f"(seconds per round; Flower's round 1 starts Ray's actors)"]
        header = f"{'round':<7}{'in-process':>12}{'flower':>10}{'ratio':>8}   flower phases"
        lines += [header, "-" * len(header)]
        for round_, ours in r["times_s"]["in_process"].items():
            theirs = r["times_s"]["flower"][round_]
            phases = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in theirs.items() if k not in ("round_s", "other_s"))
            lines.append(f"{round_:<7}{ours['round_s']:>12.2f}{theirs['round_s']:>10.2f}"
                         f"{theirs['round_s'] / ours['round_s']:>8.2f}   {phases}")
        lines += [f"Flower / in-process over rounds {r['ratio_rounds']}: {r['flower_over_in_process']:.2f} "
                  f"(target <= 1.3); test metrics equal: {r['test_metrics_equal']}", ""]
    lines += ["bytes per client per round, each way (its sub-model), against FedAvg's full model"]
    header = f"{'family':<13}" + "".join(f"{level:>17}" for level in LEVEL_RATES)
    lines += [header, "-" * len(header)]
    for family, levels in report["bytes"].items():
        lines.append(f"{family:<13}" + "".join(f"{v['mb']:>8.2f} MB {v['of_fedavg']:>5.1%}" for v in levels.values()))
    return "\n".join(lines)
