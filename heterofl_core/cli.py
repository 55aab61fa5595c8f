"""The ``heterofl`` command line: sizes, control, run, reproduce, bench, data, pool, runs.

An installed extra adds its commands through the entry-point group ``heterofl.commands``
(heterofl_flower adds ``flower``): the core never imports an extra.

Bad input (a control string, a config value, missing or corrupt data, a run
folder that cannot be resumed) ends with a one-line message on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Sequence

from .config import ConfigError, ExperimentConfig, dataset_family, parse_control, parse_overrides
from .data import DATA_ROOT_RULE
from .datasets import dataset_names, get_dataset, register_dataset
from .families import FAMILIES

EXIT_BAD_INPUT = 2
COMMAND_GROUP = "heterofl.commands"  # entry points: functions that add an extra's commands to the parser

if TYPE_CHECKING:
    import pandas as pd


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="NAME",
                        help=f"dataset: {', '.join(dataset_names())}, or a folder of your own under the data root "
                             "(images as train/<class>/ and test/<class>/, or text as {train,valid,test}.tokens); "
                             "`heterofl data status` lists them")
    parser.add_argument("--control", required=True, metavar="STRING",
                        help="the authors' control string fed_users_frac_split_modelsplit_mode_norm_scale_mask, "
                             "e.g. 1_100_0.1_iid_fix_a2-b8_bn_1_1")
    parser.add_argument("--rounds", type=int, help="communication rounds (default: the paper's for this dataset)")
    parser.add_argument("--local-epochs", type=int, help="local epochs per round (default: the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, client split and every round (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set lr=0.05 --set milestones=50,100 "
                             "--set resnet_blocks=2,2,2,2 --set mask_fill=-inf (repeatable)")
    parser.add_argument("--data-root", metavar="DIR",
                        help=f"where datasets live ({DATA_ROOT_RULE})")
    parser.add_argument("--out", metavar="DIR", help="run folder for config, metrics.csv and checkpoints (default: "
                                                      "runs/<data>_<control>_seed<seed>, then each setting changed from "
                                                      "the control string's preset, e.g. _rounds-2)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice; "
                                                                 "1 is often faster on a busy shared CPU)")
    parser.add_argument("--one-by-one", action="store_true",
                        help="train every client on its own, as each Flower node does (the same numbers as "
                             "`heterofl flower simulate`, bit for bit); by default same-width narrow clients "
                             "train as one batched computation, equal up to float rounding")
    parser.add_argument("--reuse-host-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="keep freed host memory in this process for reuse (glibc; this program opts in by default, a "
                             "library call never does): fewer page faults per batch on a CPU, worth about a quarter "
                             "of the MNIST sBN pass, but the process keeps its peak memory until it exits; "
                             "--no-reuse-host-memory gives freed memory back")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides = parse_overrides(args.overrides)
    overrides["seed"] = args.seed
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    if args.local_epochs is not None:
        overrides["local_epochs"] = args.local_epochs
    use_dataset(args.data, getattr(args, "data_root", None))
    return parse_control(args.control, args.data, **overrides)


def use_dataset(name: str, data_root: str | None) -> None:
    """Make ``--data NAME`` known to this process: a registered dataset as it is, a folder of one's own under
    the data root registered for the run (this program owns its process; a library call never registers).
    An unknown name is refused with the list of datasets and a "did you mean"."""
    if name not in dataset_names():
        register_dataset(get_dataset(name, data_root))


def default_out(cfg: ExperimentConfig, prefix: str = "") -> str:
    """The run folder when --out is not given: runs/<prefix><data>_<control>_seed<seed>, then every setting that
    differs from the control string's paper preset (--rounds, --local-epochs, --set), e.g.
    ``_rounds-2_participants-widest``: runs of different configs never share a folder."""
    preset = parse_control(cfg.control, cfg.dataset, seed=cfg.seed)
    changed = [f"_{field.name}-{_folder_value(getattr(cfg, field.name))}" for field in dataclasses.fields(cfg)
               if getattr(cfg, field.name) != getattr(preset, field.name)]
    return f"runs/{prefix}{cfg.dataset}_{cfg.control}_seed{cfg.seed}{''.join(changed)}"


def _folder_value(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        return "-".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cmd_run(args: argparse.Namespace) -> int:
    from .cohort import CohortRule
    from .federated import run_experiment
    from .machine import reuse_host_memory, set_cpu_threads
    cfg = config_from_args(args)
    set_cpu_threads(args.threads)
    if args.reuse_host_memory:
        reuse_host_memory()
    out = args.out or default_out(cfg)
    cohort_rule = CohortRule(0.0, "--one-by-one") if args.one_by_one else None
    frame = run_experiment(cfg, data_root=args.data_root, out_dir=out, device=args.device,
                           resume=args.resume, quiet=args.quiet, cohort_rule=cohort_rule)
    print(finished_line(cfg, out, frame))
    return 0


def finished_line(cfg: ExperimentConfig, out: str, frame: "pd.DataFrame") -> str:
    """What a finished run prints: its folder and last test metrics."""
    last = frame[frame["round"] == frame["round"].max()]
    summary = {row.metric: row.value for row in last.itertuples() if row.split == "test"}
    return f"finished {cfg.rounds} rounds -> {out}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items())


def _cmd_sizes(args: argparse.Namespace) -> int:
    from .sizes import format_table, mixture_sizes
    if args.model is None and args.data is None:
        raise ConfigError("sizes needs --model or --data (the family follows the data)")
    model = args.model or dataset_family(args.data).name
    rows = mixture_sizes(model, args.mode, vocab_size=args.vocab_size, dataset=args.data,
                         resnet_blocks=tuple(args.resnet_blocks))
    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


def _cmd_control(args: argparse.Namespace) -> int:
    cfg = parse_control(args.string, args.data)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        width = max(len(k) for k in cfg.to_dict())
        print("\n".join(f"{k:<{width}}  {v}" for k, v in cfg.to_dict().items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``heterofl`` argument parser."""
    parser = argparse.ArgumentParser(prog="heterofl", description="HeteroFL: federated learning for clients of "
                                     "unequal compute (Diao et al., ICLR 2021).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sizes = commands.add_parser("sizes", help="parameters, FLOPs and MB per level and for a mixture",
                                description="One row per level of the mode and one for the mixture. FLOPs follow "
                                            "the authors' counter (spec section 8); 'FLOPs (standard)' is "
                                            "torch.utils.flop_counter's count, shown beside it.")
    sizes.add_argument("--model", choices=list(FAMILIES), help="model family: " + ", ".join(
        f"{name} ({family.display})" for name, family in FAMILIES.items()) + " (default: the one --data takes)")
    sizes.add_argument("--data", metavar="NAME", help="count the model for this dataset's classes, channels and image "
                                                      "size (default: the family's paper dataset); any of "
                                                      f"{', '.join(dataset_names())}")
    sizes.add_argument("--mode", default="a-b-c-d-e",
                       help="levels with optional proportions, e.g. a-b-c-d-e or a2-b8 (default a-b-c-d-e)")
    sizes.add_argument("--vocab-size", type=int,
                       help="vocabulary of a text family (default: its paper corpus's, 33279 for WikiText2, the authors' vocabulary; "
                            "the mask token is added)")
    sizes.add_argument("--resnet-blocks", type=int, nargs=4, default=[1, 1, 1, 2], metavar="N",
                       help="blocks per ResNet18 stage (default 1 1 1 2, the paper's; the authors' later code: 2 2 2 2)")
    sizes.add_argument("--json", action="store_true", help="a JSON list of rows instead of a table")
    sizes.set_defaults(handler=_cmd_sizes)

    control = commands.add_parser("control", help="parse a control string and print the resolved config")
    control.add_argument("string", help="e.g. 1_100_0.1_iid_fix_a2-b8_bn_1_1")
    control.add_argument("--data", default="MNIST", help="dataset whose paper presets fill the rest (default MNIST)")
    control.add_argument("--json", action="store_true", help="print JSON")
    control.set_defaults(handler=_cmd_control)

    run = commands.add_parser("run", help="run (or resume) one federated experiment",
                              description="Runs an experiment with the paper's settings for the dataset, writes a "
                                          "run folder (run.json, metrics.csv, checkpoint.pt, best.pt) and can resume.")
    add_run_options(run)
    run.set_defaults(handler=_cmd_run)

    from .reproduce import add_command as add_reproduce
    add_reproduce(commands)

    from .bench import add_command as add_bench
    add_bench(commands)

    from .data_cli import add_command as add_data
    add_data(commands)

    from .pool import add_command as add_pool
    add_pool(commands)

    from .packs import add_command as add_packs
    add_packs(commands)

    for extra in sorted(entry_points(group=COMMAND_GROUP), key=lambda point: point.name):
        extra.load()(commands)  # an installed extra's commands (heterofl_flower's `flower`); imports no Flower yet

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``heterofl`` and ``python -m heterofl_core``."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:  # ConfigError, DataError, RunError and the library's other input checks
        print(f"heterofl {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"heterofl {args.command}: interrupted; a run continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
