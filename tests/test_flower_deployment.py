"""A real Flower deployment on 127.0.0.1: one SuperLink and two SuperNodes as separate processes
(the nodes started through ``heterofl flower supernode``), the app submitted with ``flwr run``,
a temporary Flower home. Every process runs in its own session and is ended by its id (its
process group: Flower's servers start helper processes). Its metrics must equal the
in-process run's, bit for bit (one-by-one training; sBN from the nodes' own passes); a node
killed mid-round and restarted must leave a run that goes on and says what happened."""

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
KILL_RUN_LIMIT_S = 540  # four rounds and the SuperLink's wait for a dead node's heartbeat (up to 60 s)


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


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1 with a temporary Flower home: every process in its own
    session (Flower's servers start helper processes), ended with its helpers by its id on exit."""

    def __init__(self, tmp_path: Path, data: Path) -> None:
        self.tmp_path, self.data, self.port = tmp_path, data, free_port()
        home = tmp_path / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "rehearsal"\n\n[superlink.rehearsal]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Deployment:
        link = self.start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                           "--host", "127.0.0.1", "--port", str(self.port)], "superlink.log")
        wait_for_port(self.port, link)
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            _end(process)

    def start(self, command: list[str], log: str) -> subprocess.Popen:
        with open(self.tmp_path / log, "a") as out:
            process = subprocess.Popen(command, env=self.env, cwd=self.tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def supernode(self, partition: int, partitions: int = 2) -> subprocess.Popen:
        """A node started through ``heterofl flower supernode``; its log is supernode<partition>.log."""
        return self.start([sys.executable, "-m", "heterofl_core", "flower", "supernode", "--superlink",
                           f"127.0.0.1:{self.port}", "--partition", str(partition), "--partitions", str(partitions),
                           "--data-root", str(self.data), "--data", "MNIST", "--", "--insecure", "--host",
                           "127.0.0.1", "--port", str(free_port())], f"supernode{partition}.log")

    def submit(self, run_config: str) -> subprocess.Popen:
        """``flwr run`` of the app with ``run_config``, streaming its log to flwr-run.log."""
        return self.start([str(BIN / "flwr"), "run", str(APP_DIR), "rehearsal", "--stream", "--run-config",
                           run_config], "flwr-run.log")

    def log(self, name: str) -> str:
        path = self.tmp_path / name
        return path.read_text() if path.exists() else ""


@pytest.mark.slow
def test_deployment_on_localhost_equals_the_in_process_run(tmp_path):
    data = tmp_path / "data"
    write_tiny_mnist(data, n_train=200, n_test=50)
    with Deployment(tmp_path, data) as deployment:
        for partition in range(2):
            deployment.supernode(partition)
        run = deployment.submit(f'data="MNIST" control="{CONTROL}" supernodes=2 rounds=2 out="{tmp_path / "deployed"}" '
                                f'set="{SETTINGS}" data-root="{data}"')
        assert run.wait(RUN_LIMIT_S) == 0, deployment.log("flwr-run.log")
        assert (tmp_path / "deployed" / "metrics.csv").exists(), \
            f"the ServerApp wrote no run folder:\n{deployment.log('flwr-run.log')}"

    overrides = dict(item.split("=") for item in SETTINGS.split())
    cfg = parse_control(CONTROL, "MNIST", rounds=2, local_epochs=int(overrides["local_epochs"]),
                        sbn_source=overrides["sbn_source"])
    run_experiment(cfg, data_root=data, out_dir=tmp_path / "in-process", quiet=True, cohort_rule=CohortRule(0.0))
    ours, theirs = (_tested(read_metrics(tmp_path / name)) for name in ("deployed", "in-process"))
    assert sorted(ours["round"].unique()) == [1, 2]
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)


@pytest.mark.slow
def test_a_node_killed_mid_round_is_skipped_and_gets_work_again_once_restarted(tmp_path):
    """Node 1 is killed while it trains in round 1; the round aggregates the replies that came (once
    the SuperLink declares the node offline), the next round samples only node 0's users and says which
    it skipped, and node 1, restarted on its partition under a new id, gets work again. metrics.csv
    records who was asked and who replied per level; the run folder keeps every round."""
    data = tmp_path / "data"
    write_tiny_mnist(data, n_train=200, n_test=50)
    out = tmp_path / "deployed"
    with Deployment(tmp_path, data) as deployment:
        nodes = [deployment.supernode(partition) for partition in range(2)]
        run = deployment.submit(f'data="MNIST" control="{CONTROL}" supernodes=2 rounds=4 out="{out}" '
                                f'set="local_epochs=1" data-root="{data}"')
        wait_until(lambda: "Receiving: train message" in deployment.log("supernode1.log"), run, "node 1 trains")
        _end(nodes[1], signal.SIGKILL)  # mid-round: no goodbye to the SuperLink
        wait_until(lambda: _rounds_done(out) >= 1, run, "round 1 ends without node 1")
        deployment.supernode(1)  # the same partition, a new node id
        assert run.wait(KILL_RUN_LIMIT_S) == 0, deployment.log("flwr-run.log")
        restarted = deployment.log("supernode1.log").split("SuperNode ID")[-1]
        assert "Receiving: train message" in restarted, "the restarted node got work"

    metrics = read_metrics(out)
    assert sorted(metrics["round"].unique()) == [1, 2, 3, 4], "nothing in the run folder lost"
    counts = metrics.pivot_table(index="round", columns="metric", values="value")
    assert counts.loc[1, "users_replied"] < counts.loc[1, "users_asked"], "round 1 lost node 1's clients"
    assert counts.loc[2, "users_skipped"] > 0 and counts.loc[2, "users_replied"] == counts.loc[2, "users_asked"], \
        "round 2 sampled only the users of the connected node"
    assert counts.loc[4, "users_skipped"] == 0 and counts.loc[4, "users_replied"] == counts.loc[4, "users_asked"]
    for level in ("a", "e"):
        assert (counts[f"replied_{level}"] <= counts[f"asked_{level}"]).all()
    assert set(counts["short_round"]) <= {0.0, 1.0}


def wait_until(condition, run: subprocess.Popen, what: str, limit_s: float = KILL_RUN_LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if run.poll() is not None:
            raise AssertionError(f"the run ended (code {run.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {limit_s} s for: {what}")
        time.sleep(0.3)


def _rounds_done(out: Path) -> int:
    try:
        return int(read_metrics(out)["round"].max())
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _end(process: subprocess.Popen, first: signal.Signals = signal.SIGTERM) -> None:
    """End a process and the helpers it started (its session's group), by its id."""
    for sig, wait_s in ((first, 10), (signal.SIGKILL, 5)):
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
