"""``heterofl data``: which datasets are where (``status``) and downloading them (``fetch``).

Both read and write the data root of every other command (``resolve_data_root``). A fetch that
cannot reach any source (offline) ends, like every bad input, with its message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .data import DATA_ROOT_RULE, DataError, resolve_data_root
from .datasets import DATASETS, DatasetStatus, dataset_status, fetch_dataset, fetchable, status_of

FETCHABLE = fetchable()


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``heterofl data status`` and ``heterofl data fetch``."""
    data = commands.add_parser("data", help="which datasets are present (status), download them (fetch)",
                               description="Datasets under the data root: `status` lists each one (found or not, "
                                           "where, what, how big) without decoding anything; `fetch` downloads "
                                           f"{', '.join(FETCHABLE)} in a layout the loaders read.")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")

    status = actions.add_parser("status", help="each dataset: found or not, where, its source and size")
    status.add_argument("--data-root", metavar="DIR", help=f"where datasets live ({DATA_ROOT_RULE})")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(handler=_cmd_status)

    fetch = actions.add_parser("fetch", help="download datasets into the data root (needs internet)",
                               description="; ".join(f"{d.name} from {d.fetched_from}" for d in DATASETS.values()
                                                     if d.fetch is not None) + ". A dataset already present is left "
                                           "as it is. Without internet: exit code 2 and what to do instead.")
    fetch.add_argument("names", nargs="+", metavar="NAME", help=f"any of {', '.join(FETCHABLE)}")
    fetch.add_argument("--data-root", metavar="DIR", help=f"where datasets live ({DATA_ROOT_RULE})")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar for WikiText2's downloads")
    fetch.set_defaults(handler=_cmd_fetch)


def format_status(rows: list[DatasetStatus]) -> str:
    """One line per dataset: name, found, MB, source, path; then how to get the missing ones."""
    table = [("dataset", "found", "MB", "source", "path")]
    table += [(r.name, "yes" if r.found else "no", f"{r.size_mb:.1f}" if r.found else "-", r.source or "-",
               str(r.path)) for r in rows]
    w = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d:<{w[3]}}  {e}" for a, b, c, d, e in table]
    missing = [r.name for r in rows if not r.found and r.fetchable]
    if missing:
        lines.append(f"missing: heterofl data fetch {' '.join(missing)}   (needs internet; or copy the files to "
                     "the path shown)")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    root = resolve_data_root(args.data_root)
    rows = dataset_status(root)
    if args.json:
        records = [{**dataclasses.asdict(r), "path": str(r.path)} for r in rows]
        print(json.dumps({"data_root": str(root), "rule": DATA_ROOT_RULE, "datasets": records}, indent=2))
    else:
        print(f"data root: {root}\n  rule: --data-root when given; {DATA_ROOT_RULE}\n")
        print(format_status(rows))
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    root = resolve_data_root(args.data_root)
    failures = []
    for name in args.names:
        if (before := status_of(name, root)).found:
            print(f"{name}: already present: {before.source}, {before.size_mb:.1f} MB at {before.path}")
            continue
        try:
            after = fetch_dataset(name, root, progress=not args.quiet)
        except DataError as error:  # one dataset failing does not stop the others
            failures.append(str(error))
            continue
        print(f"{name}: fetched: {after.source}, {after.size_mb:.1f} MB at {after.path}")
    if failures:
        raise DataError("\n\n".join(failures))
    return 0


TEXT = "text"  # ensure_data's word for "a text corpus": WikiText2, else SOTU


def ensure_data(names: Sequence[str], data_root: str | os.PathLike | None = None) -> Path:
    """For a notebook's set-up cell: fetch each dataset of ``names`` missing from the data root (it needs
    internet), say in one line what is where, and return the root. ``"text"`` is WikiText2, or the substitute
    corpus already there (SOTU); a fetch that fails raises its DataError, which says what to do instead."""
    root = resolve_data_root(data_root)
    said = []
    for name in names:
        if name == TEXT:
            if status_of("SOTU", root).found and not status_of("WikiText2", root).found:
                said.append("SOTU (the text substitute)")
                continue
            name = "WikiText2"
        if status_of(name, root).found:
            said.append(name)
            continue
        print(f"{name} is not at {root}: fetching it ...", flush=True)
        fetch_dataset(name, root)
        said.append(f"{name} (fetched)")
    print(f"data root {root}" + (f": {', '.join(said)}" if said else " (nothing to fetch for this notebook)"))
    return root
