"""The server side: Flower's ``ServerApp``, writing the same run folder as ``heterofl run``.

:func:`serve` runs one experiment on a grid (a simulation's, a SuperLink's, or a test's
stand-in): the library's loop (``federated.run_experiment``: run.json, metrics.csv,
checkpoints, resume, progress bar) with each round run by :class:`FlowerRounds` through
:class:`~heterofl_flower.strategy.HeteroFLStrategy`.

Two ways in: :func:`server_app_for` (a simulation started from Python or ``heterofl flower
simulate``) and the module's ``app``, which a deployment runs (``flwr run``) with the
experiment in its run config (:meth:`FlowerRun.from_run_config`).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import flwr
import pandas as pd
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from heterofl_core.config import ExperimentConfig, parse_control, parse_overrides
from heterofl_core.federated import Federation, PhaseTimer, run_experiment
from heterofl_core.server import check_required
from heterofl_core.slicing import State

from .client_app import experiment_data
from .messages import DataChoice, to_record
from .strategy import HeteroFLStrategy, partitions


@dataclass(frozen=True)
class FlowerRun:
    """One experiment to run on a grid, and where its run folder goes."""

    cfg: ExperimentConfig
    out: str
    supernodes: int  # nodes to wait for before the first round
    resume: bool = False
    data_root: str | None = None
    device: str = "auto"
    quiet: bool = False
    mode: str = "simulation"  # simulation or deployment (recorded in run.json)
    timeout: float | None = None  # seconds to wait for a round's replies; None: all of them
    connect_timeout: float = 300.0  # seconds to wait for the nodes to connect
    train_samples: int | None = None  # a seeded subset of the data (run_cache.subset); None: all of it
    test_samples: int | None = None
    required: str = "widest"  # replies below this make a round short (heterofl_core.server.reply_counts)

    @classmethod
    def from_run_config(cls, config: dict[str, object]) -> FlowerRun:
        """From a Flower run config (``flwr run --run-config``); its keys are :data:`RUN_CONFIG_KEYS`,
        each declared with its default in the app's pyproject.toml."""
        missing = [key for key in ("data", "control", "supernodes", "out") if key not in config]
        if missing:
            raise ValueError(f"the run config lacks {', '.join(missing)}; e.g. flwr run <app> <superlink> --run-config "
                             f"'data=\"MNIST\" control=\"1_10_0.5_iid_fix_a1-e1_bn_1_1\" supernodes=2 out=\"runs/x\"'")
        if unknown := sorted(set(config) - set(RUN_CONFIG_KEYS)):
            raise ValueError(f"unknown run-config keys {unknown}; valid: {', '.join(RUN_CONFIG_KEYS)}")
        overrides = parse_overrides(shlex.split(str(config.get("set", ""))))
        for key, field in (("rounds", "rounds"), ("local-epochs", "local_epochs"), ("seed", "seed")):
            if key in config and (key == "seed" or int(config[key]) > 0):  # type: ignore[arg-type]  # 0: the paper's
                overrides[field] = int(config[key])  # type: ignore[arg-type]
        cfg = parse_control(str(config["control"]), str(config["data"]), **overrides)

        def number(key: str) -> int | None:  # 0: none
            return int(config.get(key, 0)) or None  # type: ignore[call-overload]

        return cls(cfg, str(config["out"]), int(config["supernodes"]), bool(config.get("resume", False)),  # type: ignore[call-overload]
                   str(config.get("data-root", "")) or None, str(config.get("device", "auto")), quiet=True,
                   mode="deployment", timeout=float(config.get("timeout", 0)) or None,  # type: ignore[arg-type]
                   train_samples=number("train-samples"), test_samples=number("test-samples"),
                   required=check_required(str(config.get("short-round", "widest"))))


# A deployment's run-config keys (flwr run --run-config): the app's pyproject.toml declares each with its default
# and what it means; tests/test_flower.py checks the two lists agree.
RUN_CONFIG_KEYS = ("data", "control", "supernodes", "out", "rounds", "local-epochs", "seed", "set", "resume",
                   "data-root", "device", "timeout", "train-samples", "test-samples", "short-round")


class FlowerRounds:
    """One round through Flower (the ``rounds_by`` of ``run_experiment``): the strategy configures
    the round, the grid carries the messages, the strategy aggregates and evaluates."""

    def __init__(self, strategy: HeteroFLStrategy, grid: Grid) -> None:
        self.strategy, self.grid = strategy, grid

    def __call__(self, state: State, round_: int) -> tuple[State, dict[str, float]]:
        strategy = self.strategy
        timer = PhaseTimer(strategy.federation.device)
        with timer.phase("round"):
            record = strategy.record if state is strategy.state and strategy.record is not None else to_record(state)
            with timer.phase("split"):
                messages = strategy.configure_train(round_, record, ConfigRecord(), self.grid)
            with timer.phase("local_training"):
                replies = list(self.grid.send_and_receive(messages, timeout=strategy.timeout))
            with timer.phase("aggregate"):
                arrays, trained = strategy.aggregate_train(round_, replies)
            tested: dict[str, float] = {}
            if strategy.steps.evaluates(round_):
                tested = dict(strategy.evaluate(round_, arrays, self.grid, timer))
        return strategy.state, {**tested, **dict(trained), **timer.report()}


def serve(grid: Grid, run: FlowerRun) -> pd.DataFrame:
    """Run ``run`` on ``grid`` once its nodes have connected; return the tidy metrics."""
    wait_for_nodes(grid, run.supernodes, run.connect_timeout)

    choice = DataChoice(run.data_root, run.train_samples, run.test_samples)
    data = experiment_data(run.cfg.dataset, run.data_root, run.train_samples, run.test_samples)

    def rounds_by(federation: Federation) -> FlowerRounds:
        strategy = HeteroFLStrategy(federation, choice, run.timeout, run.required)
        strategy.nodes = partitions(grid, run.connect_timeout)  # before the first round: not in its time
        return FlowerRounds(strategy, grid)

    return run_experiment(run.cfg, data=data, out_dir=run.out, device=run.device, resume=run.resume,
                          quiet=run.quiet, rounds_by=rounds_by,
                          runtime={"engine": "flower", "mode": run.mode, "supernodes": run.supernodes,
                                   "flwr": flwr.__version__})


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    """Wait until ``count`` nodes have connected to the grid."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {connected} of {count} nodes connected within {timeout:.0f} s")
        time.sleep(0.5)


def server_app_for(run: FlowerRun, outcome: dict[str, object] | None = None) -> ServerApp:
    """A ``ServerApp`` that serves ``run``; ``outcome`` receives its ``metrics`` or its ``error``."""
    app = ServerApp()
    outcome = {} if outcome is None else outcome

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["metrics"] = serve(grid, run)
        except BaseException as error:  # the caller's thread reports it: Flower only logs it
            outcome["error"] = error
            raise

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """A deployment's server: the experiment comes from the run config."""
    run = FlowerRun.from_run_config(dict(context.run_config))
    Path(run.out).mkdir(parents=True, exist_ok=True)
    serve(grid, run)
