"""Ready results for slow laptops: the notebooks' run cache packed on one machine, unpacked on another.

A notebook reads a finished run back instead of training it when its folder is in the runs folder under the
key of (config, data subset, results version) (run_cache.py). So a teacher runs the workshop profile once
(``heterofl reproduce --profile workshop --out room``), packs ``room/runs`` (``heterofl runs pack``) and hands
the file out; a participant unpacks it (``heterofl runs unpack``) into the runs folder the notebooks use, and
every cell reads its runs back in seconds. The pack carries the results version of the code that trained the
runs; unpacking refuses a pack from other code, since its runs would never be read back (their keys differ)
and would only look like a cache.

A pack holds what reading back needs, each run's ``run.json``, ``metrics.csv`` and ``experiment.json``, and a
``MANIFEST.json``; checkpoints only with ``checkpoints=True`` (they are the bulk, and only resuming needs them).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .runs import code_version, results_version

MANIFEST = "MANIFEST.json"
READ_BACK = ("run.json", "metrics.csv", "experiment.json")  # what run_cache.finished / run_cached read
CHECKPOINTS = ("checkpoint.pt", "best.pt")


class PackError(ValueError):
    """A pack that cannot be made or used here; the message says why and what to do."""


def pack_runs(runs_dir: str | os.PathLike, out: str | os.PathLike, *, profile: str | None = None,
              checkpoints: bool = False) -> dict[str, Any]:
    """Pack every finished run under ``runs_dir`` trained by this code's results version into the ``.tar.gz``
    ``out``; runs of other code are left out (and counted). Returns the manifest."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise PackError(f"{root} is not a folder of runs; give the runs folder of a reproduction "
                        f"(e.g. reproduction/runs, or <out>/runs of `heterofl reproduce --out`)")
    ours = results_version()
    folders, other = [], []
    for run_json in sorted(root.rglob("run.json")):
        folder = run_json.parent
        if not (folder / "metrics.csv").is_file():
            continue
        version = json.loads(run_json.read_text()).get("results_version")
        (folders if version == ours else other).append(folder)
    if not folders:
        raise PackError(f"no finished run of this code (results version {ours}) under {root}"
                        + (f"; {len(other)} run(s) of other code left out" if other else ""))
    names = READ_BACK + (CHECKPOINTS if checkpoints else ())
    manifest = {"results_version": ours, "code_version": code_version(), "profile": profile,
                "runs": [folder.relative_to(root).as_posix() for folder in folders], "left_out_other_code": len(other),
                "checkpoints": checkpoints, "packed": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as archive:
        _add_bytes(archive, MANIFEST, json.dumps(manifest, indent=2).encode())
        for folder in folders:
            for name in names:
                if (folder / name).is_file():
                    archive.add(folder / name, arcname=f"runs/{folder.relative_to(root).as_posix()}/{name}")
    return manifest


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a pack, or :class:`PackError` when the file is not one."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            member = archive.extractfile(MANIFEST)
            if member is None:
                raise KeyError(MANIFEST)
            return json.loads(member.read())
    except (OSError, tarfile.TarError, KeyError, ValueError) as error:
        raise PackError(f"{path} is not a pack of runs ({error}); make one with `heterofl runs pack`") from None


def unpack_runs(path: str | os.PathLike, runs_dir: str | os.PathLike) -> dict[str, Any]:
    """Unpack the pack ``path`` into ``runs_dir`` (existing runs are kept; the pack's files replace theirs).
    Refuses a pack trained by other code than this installation's (:class:`PackError`). Returns its manifest."""
    manifest = read_manifest(path)
    ours = results_version()
    if manifest.get("results_version") != ours:
        raise PackError(f"{path} holds runs of other code (results version {manifest.get('results_version')}, "
                        f"code {manifest.get('code_version')}); this installation is {ours} ({code_version()}). "
                        f"The notebooks would not read them back: get the pack made with this code, or install the "
                        f"code it names")
    target = Path(runs_dir).resolve()
    with tarfile.open(path, "r:gz") as archive:
        members = [m for m in archive.getmembers() if m.name != MANIFEST]
        for member in members:
            relative = Path(member.name)
            if not member.isfile() or relative.parts[:1] != ("runs",) or ".." in relative.parts or relative.is_absolute():
                raise PackError(f"{path}: unexpected entry {member.name!r}; a pack holds files under runs/ only")
        for member in members:
            destination = target / Path(member.name).relative_to("runs")
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            destination.write_bytes(source.read())
    return manifest


# ----------------------------------------------------------------------------- the command

def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``heterofl runs pack`` and ``heterofl runs unpack``."""
    from .experiments import default_out_dir

    runs = commands.add_parser("runs", help="pack the notebooks' finished runs for another machine, or unpack them",
                               description="Ready results for slow laptops: `pack` puts the finished runs of a "
                                           "reproduction (this code's) into one .tar.gz; `unpack` puts them where "
                                           "the notebooks read runs back, after checking they were trained by "
                                           "this code.")
    actions = runs.add_subparsers(dest="action", required=True, metavar="ACTION")
    pack = actions.add_parser("pack", help="pack a runs folder into a .tar.gz")
    pack.add_argument("runs_dir", metavar="RUNS", help="a runs folder, e.g. <out>/runs of `heterofl reproduce --out`")
    pack.add_argument("--out", required=True, metavar="FILE", help="the pack to write, e.g. workshop-runs.tar.gz")
    pack.add_argument("--profile", help="the profile the runs were made at (recorded in the pack)")
    pack.add_argument("--checkpoints", action="store_true", help="include checkpoints (only resuming needs them)")
    pack.set_defaults(handler=_cmd_pack)
    unpack = actions.add_parser("unpack", help="unpack a pack where the notebooks read runs back")
    unpack.add_argument("pack", metavar="FILE", help="a pack made by `heterofl runs pack`")
    unpack.add_argument("--into", metavar="DIR", default=str(default_out_dir() / "runs"),
                        help="the runs folder (default: the notebooks' own, reproduction/interactive/runs)")
    unpack.set_defaults(handler=_cmd_unpack)


def _cmd_pack(args: argparse.Namespace) -> int:
    manifest = pack_runs(args.runs_dir, args.out, profile=args.profile, checkpoints=args.checkpoints)
    print(f"packed {len(manifest['runs'])} runs (results version {manifest['results_version']}) -> {args.out}"
          + (f"; left out {manifest['left_out_other_code']} run(s) of other code" if manifest["left_out_other_code"]
             else ""))
    return 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    manifest = unpack_runs(args.pack, args.into)
    print(f"unpacked {len(manifest['runs'])} runs ({manifest.get('profile') or 'profile not recorded'}, "
          f"code {manifest['code_version']}) into {args.into}: the notebooks read them back")
    return 0
