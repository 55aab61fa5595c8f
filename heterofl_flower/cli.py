"""``heterofl flower``: the same experiments on Flower (its ``flower`` extra).

- ``heterofl flower simulate``: Flower's Simulation Engine on Ray, writing the same run
  folder as ``heterofl run``.
- ``heterofl flower supernode``: a thin wrapper over ``flower-supernode`` that gives a node
  its partition and data root (the deployment recipe: README, "Flower").
- ``heterofl flower app``: the folder of the Flower app that ``flwr run`` submits.

Flower is imported only when one of these runs; without it they end with the command
that installs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

APP_DIR = Path(__file__).with_name("app")  # the Flower app project (pyproject.toml) for `flwr run`
INSTALL_HINT = "pip install 'heterofl[flower]' (Python >= 3.11; a checkout's `make install` has it)"


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``heterofl flower ...`` to the ``heterofl`` parser."""
    from heterofl_core.cli import add_run_options

    flower = commands.add_parser("flower", help="run experiments on Flower: simulation on Ray, or real devices",
                                 description="HeteroFL on Flower 1.42: `simulate` runs an experiment through "
                                             "Flower's Simulation Engine on Ray; `supernode` starts a node of a "
                                             "deployment; `app` prints the Flower app folder that `flwr run` submits.")
    actions = flower.add_subparsers(dest="action", required=True, metavar="ACTION")

    simulate = actions.add_parser("simulate", help="run an experiment through Flower's Simulation Engine (Ray)",
                                  description="The experiment of `heterofl run` with the same arguments, its clients "
                                              "on virtual SuperNodes in Ray; writes the same run folder.")
    add_run_options(simulate)
    simulate.add_argument("--supernodes", type=int, default=10, metavar="N",
                          help="virtual SuperNodes; user u lives on node u mod N (default 10)")
    simulate.add_argument("--cpus-per-node", type=float, default=1.0, metavar="C",
                          help="CPUs a node's ClientApp takes in Ray: how many train at once (default 1)")
    simulate.add_argument("--gpus-per-node", type=float, default=0.0, metavar="G",
                          help="share of a GPU per node's ClientApp (default 0)")
    simulate.add_argument("--ray-address", metavar="HOST:PORT",
                          help="a running Ray cluster to spread the nodes over (default: a local Ray)")
    simulate.add_argument("--timeout", type=float, metavar="S",
                          help="seconds to wait for a round's replies; later replies do not count (default: all)")
    simulate.add_argument("--train-samples", type=int, metavar="N",
                          help="train on a seeded random subset of N training samples (as the notebooks' profiles)")
    simulate.add_argument("--test-samples", type=int, metavar="N", help="evaluate on a seeded subset of N test samples")
    simulate.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    simulate.set_defaults(handler=_cmd_simulate)

    supernode = actions.add_parser("supernode", help="start a Flower SuperNode holding one partition (deployment)",
                                   description="Checks this node's data (exit code 2 when its data root holds "
                                               "none, or not the datasets named with --data), then runs "
                                               "`flower-supernode --superlink HOST:PORT --node-config "
                                               "\"partition-id=K num-partitions=N data-root=DIR\"` plus any other "
                                               "flower-supernode options given after --.")
    supernode.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API")
    supernode.add_argument("--partition", required=True, type=int, metavar="K", help="this node's partition, 0..N-1")
    supernode.add_argument("--partitions", required=True, type=int, metavar="N", help="how many nodes there are")
    supernode.add_argument("--data-root", metavar="DIR", help="this node's own data root (default: the library's rule)")
    supernode.add_argument("--data", action="append", default=[], metavar="NAME",
                           help="a dataset this node must hold (repeatable); checked before the node starts, which "
                                "otherwise needs at least one dataset under its data root")
    supernode.add_argument("--download", action="store_true",
                           help="let the node download a missing dataset when a run asks for it (default: never)")
    supernode.add_argument("--device", default="cpu", help="cpu or cuda[:N] for this node's training (default cpu)")
    supernode.add_argument("--print", dest="print_only", action="store_true", help="print the command, do not run it")
    supernode.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flower-supernode options")
    supernode.set_defaults(handler=_cmd_supernode)

    bench = actions.add_parser("bench", help="a paper-settings MNIST round through Flower vs in-process; bytes per level",
                               description="Runs the same MNIST rounds (paper settings, "
                                           "1_100_0.1_iid_fix_a1-e1_bn_1_1) in-process and through Flower's "
                                           "simulation in one run and prints the ratio of their round times, and "
                                           "each level's bytes per round against FedAvg's full model.")
    bench.add_argument("--supernodes", type=int, default=10, metavar="N", help="virtual SuperNodes (default 10)")
    bench.add_argument("--rounds", type=int, default=2, metavar="N",
                       help="rounds of each run; the ratio skips round 1 (Ray's start) when N > 1 (default 2)")
    bench.add_argument("--bytes-only", action="store_true", help="only the bytes per level (no training)")
    bench.add_argument("--quick", action="store_true", help="1 local epoch, sBN over 2,000 images: numbers not meaningful")
    bench.add_argument("--data-root", metavar="DIR", help="where MNIST lives (the library's rule by default)")
    bench.add_argument("--json", metavar="FILE", help="also write every number to FILE as JSON")
    bench.set_defaults(handler=_cmd_bench)

    app = actions.add_parser("app", help="print the folder of the Flower app that `flwr run` submits")
    app.set_defaults(handler=_cmd_app)


def require_flower() -> None:
    """A clear error when the flower extra is not installed."""
    if sys.version_info < (3, 11):
        raise ValueError(f"Flower 1.42 needs Python >= 3.11; this is {sys.version.split()[0]}")
    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        raise ValueError(f"heterofl flower needs Flower and Ray: {INSTALL_HINT}")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from heterofl_core.cli import config_from_args, default_out, finished_line
    from heterofl_core.machine import set_cpu_threads
    require_flower()
    cfg = config_from_args(args)
    if args.supernodes < 1:
        raise ValueError(f"--supernodes must be at least 1, got {args.supernodes}")
    set_cpu_threads(args.threads)
    from .simulation import offline_environment, simulate
    from .server_app import FlowerRun
    offline_environment()
    out = args.out or default_out(cfg, "flower_")
    run = FlowerRun(cfg, out, args.supernodes, args.resume, args.data_root, args.device, args.quiet,
                    timeout=args.timeout, train_samples=args.train_samples, test_samples=args.test_samples)
    frame = simulate(run, args.cpus_per_node, args.gpus_per_node, args.ray_address, args.verbose)
    print(finished_line(cfg, out, frame))
    return 0


def supernode_command(superlink: str, partition: int, partitions: int, data_root: str | None = None,
                      device: str = "cpu", extra: list[str] | None = None, download: bool = False) -> list[str]:
    """The ``flower-supernode`` command line of one node."""
    if not 0 <= partition < partitions:
        raise ValueError(f"--partition must be in 0..{partitions - 1} for --partitions {partitions}, got {partition}")
    config = f"partition-id={partition} num-partitions={partitions} device=\"{device}\""
    if data_root:
        config += f" data-root=\"{Path(data_root).resolve()}\""
    if download:
        config += " download=true"
    executable = shutil.which("flower-supernode") or str(Path(sys.executable).with_name("flower-supernode"))
    return [executable, "--superlink", superlink, "--node-config", config, *(extra or [])]


def _cmd_bench(args: argparse.Namespace) -> int:
    require_flower()
    import json
    from .bench import bench_rounds, format_report, level_bytes
    from .simulation import offline_environment
    offline_environment()
    report = {"bytes": level_bytes()}
    if not args.bytes_only:
        report["rounds"] = bench_rounds(args.data_root, args.supernodes, args.rounds, args.quick)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    print(APP_DIR)
    return 0


def check_node_data(names: list[str], data_root: str | None) -> None:
    """Raise DataError unless the node's data root holds each dataset of ``names`` (none named: at least one)."""
    from heterofl_core.data import DataError, resolve_data_root
    from heterofl_core.datasets import dataset_status, status_of
    root = resolve_data_root(data_root)
    if not names and not any(row.found for row in dataset_status(root)):
        raise DataError(f"this node's data root {root} holds no dataset; copy one there (`heterofl data status "
                        f"--data-root {root}` shows the layouts) or fetch it first: heterofl data fetch MNIST "
                        f"--data-root {root}")
    for name in names:
        if not (row := status_of(name, root)).found:
            raise DataError(f"{name} not found under this node's data root {root} (looked at {row.path}); copy it "
                            f"there or fetch it first: heterofl data fetch {name} --data-root {root}")


def _cmd_supernode(args: argparse.Namespace) -> int:
    require_flower()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    command = supernode_command(args.superlink, args.partition, args.partitions, args.data_root, args.device, extra,
                                args.download)
    if args.print_only:
        import shlex
        print(shlex.join(command))
        return 0
    if not args.download:
        check_node_data(args.data, args.data_root)
    from .simulation import offline_environment
    offline_environment()
    os.execv(command[0], command)  # becomes flower-supernode: signals and exit code are Flower's
    return 0  # not reached
