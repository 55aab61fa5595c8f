"""``heterofl flower simulate``: an experiment through Flower's Simulation Engine (Ray).

The ServerApp (:func:`~heterofl_flower.server_app.server_app_for`) runs in this process and
writes the run folder, with the progress bar; each virtual SuperNode's ClientApp runs in
Ray actors, one CPU (or ``gpus_per_node`` of a GPU) each. Flower's ``run_simulation`` starts
it: deprecated in favour of ``flwr run`` in Flower 1.42, but the one API that runs an app
built in this process (``flwr run`` needs the app as a project folder and a SuperLink; the
deployment recipe in the README uses that). To spread a simulation over several machines,
start a Ray cluster first (``ray start --head`` / ``ray start --address``) and pass
``ray_address``: Ray then places the actors on every machine of the cluster.
"""

from __future__ import annotations

import logging
import os

import pandas as pd
from flwr.simulation import run_simulation

from .client_app import app as client_app
from .server_app import FlowerRun, server_app_for

OFFLINE_ENVIRONMENT = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}  # the last: silences a Ray FutureWarning


def simulate(run: FlowerRun, cpus_per_node: float = 1.0, gpus_per_node: float = 0.0, ray_address: str | None = None,
             verbose: bool = False) -> pd.DataFrame:
    """Run ``run`` with ``run.supernodes`` virtual SuperNodes; return its tidy metrics.

    Raises what the ServerApp raised (a bad config, a failed round), not Flower's log of it.
    """
    outcome: dict[str, object] = {}
    init_args: dict[str, object] = {"include_dashboard": False, "logging_level": logging.WARNING if verbose else logging.ERROR,
                                    "log_to_driver": verbose}
    if ray_address:
        init_args["address"] = ray_address
    backend = {"client_resources": {"num_cpus": cpus_per_node, "num_gpus": gpus_per_node}, "init_args": init_args}
    run_simulation(server_app=server_app_for(run, outcome), client_app=client_app, num_supernodes=run.supernodes,
                   backend_config=backend, verbose_logging=verbose)  # type: ignore[arg-type]
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "metrics" not in outcome:
        raise RuntimeError("the Flower simulation ended before the ServerApp finished; rerun with --verbose for its log")
    return outcome["metrics"]  # type: ignore[return-value]


def offline_environment() -> None:
    """No telemetry, update checks or Ray usage statistics (for entry points; inherited by Ray's workers)."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
