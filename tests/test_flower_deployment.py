"""A real Flower deployment on 127.0.0.1: one SuperLink and two SuperNodes as separate processes
(the nodes started through ``heterofl flower supernode``), the app submitted with ``flwr run``,
a temporary Flower home. Every process runs in its own session and is ended by its id (its
process group: Flower's servers start helper processes). Its metrics must equal the
in-process run's, bit for bit (one-by-one training; sBN from the nodes' own passes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'heterofl[flower]'")

from heterofl_core.cohort import CohortRule  # noqa: E402
from heterofl_core.config import parse_control  # noqa: E402
from heterofl_core.federated import run_experiment  # noqa: E402
from heterofl_core.runs import read_metrics  # noqa: E402
from heterofl_flower.cli import APP_DIR  # noqa: E402
from fakes import write_tiny_mnist  # noqa: E402

CONTROL = "1_10_0.5_iid_fix_a1-e1_bn_1_1"
SETTINGS = "local_epochs=1 sbn_source=clients"
BIN = Path(sys.executable).parent
RUN_LIMIT_S = 420  # the whole run: two rounds take about 2 minutes on a 2-core CPU


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {limit_s} s")


@pytest.mark.slow
def test_deployment_on_localhost_equals_the_in_process_run(tmp_path):
    data = tmp_path / "data"
    write_tiny_mnist(data, n_train=200, n_test=50)
    home, port = tmp_path / "flwr-home", free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "rehearsal"\n\n[superlink.rehearsal]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    processes: list[subprocess.Popen] = []

    def start(command: list[str], log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as out:
            process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        processes.append(process)
        return process

    try:
        link = start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                      "--host", "127.0.0.1", "--port", str(port)], "superlink.log")
        wait_for_port(port, link)
        for partition in range(2):
            start([sys.executable, "-m", "heterofl_core", "flower", "supernode", "--superlink", f"127.0.0.1:{port}",
                   "--partition", str(partition), "--partitions", "2", "--data-root", str(data), "--",
                   "--insecure", "--host", "127.0.0.1", "--port", str(free_port())], f"supernode{partition}.log")
        config = (f'data="MNIST" control="{CONTROL}" supernodes=2 rounds=2 out="{tmp_path / "deployed"}" '
                  f'set="{SETTINGS}" data-root="{data}"')
        submitted = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "rehearsal", "--stream",
                                    "--run-config", config], env=env, cwd=tmp_path, capture_output=True, text=True,
                                   timeout=RUN_LIMIT_S)
        log = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, log
        assert (tmp_path / "deployed" / "metrics.csv").exists(), f"the ServerApp wrote no run folder:\n{log}"
    finally:
        for process in processes:
            _end(process)

    overrides = dict(item.split("=") for item in SETTINGS.split())
    cfg = parse_control(CONTROL, "MNIST", rounds=2, local_epochs=int(overrides["local_epochs"]),
                        sbn_source=overrides["sbn_source"])
    run_experiment(cfg, data_root=data, out_dir=tmp_path / "in-process", quiet=True, cohort_rule=CohortRule(0.0))
    ours, theirs = (_tested(read_metrics(tmp_path / name)) for name in ("deployed", "in-process"))
    assert sorted(ours["round"].unique()) == [1, 2]
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)


def _end(process: subprocess.Popen) -> None:
    """End a process and the helpers it started (its session's group), by its id."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            os.killpg(process.pid, 0)  # helpers of the group still alive?
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _tested(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["split"] == "test"][["round", "metric", "value"]].reset_index(drop=True)
