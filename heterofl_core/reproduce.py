"""``heterofl reproduce``: execute the staged notebooks with papermill at a profile's scale.

    heterofl reproduce --profile smoke                 # every notebook end to end in minutes (CI)
    heterofl reproduce --profile workshop              # each notebook in at most 4 minutes on a laptop
    heterofl reproduce --profile quick                 # the figures: the whole suite on a laptop CPU in under 90 minutes
    heterofl reproduce --profile paper --only 03,04    # the paper's settings (a GPU; hours to days)

Each notebook gets the profile's name (and the paths) injected into its cell tagged
``parameters`` and reads its scale from the profile table (profiles.py); its executed copy is kept in ``<out>/notebooks``; its runs live
in ``<out>/runs`` (a finished run is read back, an interrupted one continues, so
running the same command again picks up where it stopped; ``--fresh`` trains
everything again); its figures (PNG, PDF and a JSON record each) go to the figures
folder, with ``reproduction.json``: the per-notebook seconds of the run. A failing notebook stops
the reproduction with the notebook, the cell and the error named (exit 1); bad
input (an unknown profile or notebook name, no data) exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .data import DATA_ROOT_RULE, repo_root, resolve_data_root
from .machine import HOST_MEMORY_ENV
from .profiles import NOTEBOOKS, PROFILES
from .runs import atomic_write, code_version

KERNEL = "python3"  # `python -m ipykernel install --sys-prefix --name python3` (the Makefile does it)


def select(only: Sequence[str] | None) -> list[str]:
    """Notebooks named by number (``03``), full stem, or a word of the stem (``mnist``); all when empty."""
    if not only:
        return list(NOTEBOOKS)
    wanted: set[str] = set()
    for token in (t.strip() for text in only for t in text.split(",")):
        if not token:
            continue
        token = token.removesuffix(".ipynb")
        hits = [nb for nb in NOTEBOOKS if nb == token or nb.split("_", 1)[0] == token.zfill(2)
                or (not token.isdigit() and token.lower() in nb.lower())]
        if not hits:
            raise ValueError(f"unknown notebook {token!r}; valid: {', '.join(NOTEBOOKS)} "
                             f"(or their numbers {NOTEBOOKS[0][:2]}-{NOTEBOOKS[-1][:2]}, or a word such as mnist)")
        wanted.update(hits)
    return [nb for nb in NOTEBOOKS if nb in wanted]


def notebook_parameters(profile: str, notebook: str, *, data_root: Path, out_dir: Path, figures_dir: Path) -> dict[str, Any]:
    """The parameters injected into one notebook: the profile and the paths. The notebook
    reads its scale from the profile (profiles.settings)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    if notebook not in NOTEBOOKS:
        raise ValueError(f"unknown notebook {notebook!r}; valid: {', '.join(NOTEBOOKS)}")
    return {"profile": profile, "data_root": str(data_root), "out_dir": str(out_dir),
            "figures_dir": str(figures_dir), "interactive": False}


class NotebookFailed(RuntimeError):
    """A notebook stopped with an error; the message names the notebook, the cell and the error."""


def execute(notebook: str, parameters: dict[str, Any], out_dir: Path, log_output: bool = False) -> Path:
    """Run one notebook through papermill; the executed copy is ``<out>/notebooks/<name>.ipynb``."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = repo_root() / "notebooks" / f"{notebook}.ipynb"
    if not source.is_file():
        raise ValueError(f"notebook {source} not found: run from a checkout of the repository")
    target = out_dir / "notebooks" / f"{notebook}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(with_solutions_run(source), str(target), parameters=parameters, kernel_name=KERNEL,
                                   cwd=str(repo_root()), progress_bar=False, log_output=log_output,
                                   request_save_on_cell_execute=True)
    except PapermillExecutionError as error:
        first = next((line for line in str(error.source).splitlines() if line.strip()), "")
        raise NotebookFailed(f"{notebook}.ipynb failed in cell {error.cell_index} (In [{error.exec_count}]: "
                             f"{first.strip()[:80]!r}): {error.ename}: {error.evalue}\n"
                             f"the executed copy with the traceback: {target}") from None
    return target


def with_solutions_run(path: Path) -> Any:
    """The notebook at ``path`` with a cell after each solution (a Markdown cell tagged ``solution``, which a
    learner's Run All never executes) that runs it as :func:`heterofl_core.exercises.run_solution` does: in a
    copy of the notebook's namespace, every check strict. So the reproduction tests every solution."""
    import nbformat

    from .exercises import solution_code

    nb = nbformat.read(path, as_version=4)
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        if cell.cell_type == "markdown" and "solution" in cell.metadata.get("tags", []):
            title, code = solution_code(cell.source)
            run = nbformat.v4.new_code_cell(
                f"# heterofl reproduce: the solution above, run in a copy of the namespace, its checks strict\n"
                f"from heterofl_core.exercises import run_solution\n"
                f"run_solution({title!r}, {code!r}, globals())", metadata={"tags": ["solution-run"]})
            cells.append(run)
    nb.cells = cells
    return nb


def figures_folder(profile: str, out: str | os.PathLike | None = None,
                   figures: str | os.PathLike | None = None) -> Path:
    """Where the figures go: ``figures`` if given; else ``./figures`` (the committed ones come from
    quick or paper); with ``out``, or for smoke (so a check never replaces them), ``<out>/figures``."""
    if figures is not None:
        return Path(figures).resolve()
    if out is not None or profile == "smoke":
        return (Path(out if out is not None else "reproduction") / "figures").resolve()
    return Path("figures").resolve()


def reproduce(profile: str, only: Sequence[str] | None = None, out: str | os.PathLike | None = None,
              figures: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
              threads: int | None = None, log_output: bool = False, fresh: bool = False) -> dict[str, Any]:
    """Execute the selected notebooks at ``profile``; returns the summary it also writes to
    ``<out>/reproduction.json`` and beside the figures (per notebook: its status and seconds; paths relative
    to the checkout). ``fresh`` deletes ``<out>/runs`` first, so every run trains again. Raises NotebookFailed
    on the first failing notebook."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    notebooks = select(only)
    root = resolve_data_root(data_root)
    if not root.is_dir():
        raise ValueError(f"data root {root} does not exist; pass --data-root DIR ({DATA_ROOT_RULE})")
    out_dir = Path(out if out is not None else "reproduction").resolve()
    figures_dir = figures_folder(profile, out, figures)
    if log_output:  # papermill logs the cells' output on its logger at INFO
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("papermill").setLevel(logging.INFO)
    if threads is not None:  # inherited by the notebook kernels
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)
    if fresh and (out_dir / "runs").is_dir():
        print(f"--fresh: deleting {out_dir / 'runs'} (every run trains again)", flush=True)
        shutil.rmtree(out_dir / "runs")
    summary_paths = [out_dir / "reproduction.json", figures_dir / "reproduction.json"]
    summary: dict[str, Any] = {"profile": profile, "data_root": portable(root), "out": portable(out_dir),
                               "figures": portable(figures_dir), "fresh": fresh, "code_version": code_version(),
                               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                               "threads": threads, "started": _now(), "notebooks": {}}
    started = time.perf_counter()
    print(f"heterofl reproduce --profile {profile}: {len(notebooks)} notebooks, data {root}, "
          f"runs {out_dir / 'runs'}, figures {figures_dir}", flush=True)
    for notebook in notebooks:
        params = notebook_parameters(profile, notebook, data_root=root, out_dir=out_dir, figures_dir=figures_dir)
        begin = time.perf_counter()
        print(f"[{notebook}] running ...", flush=True)
        try:
            target = execute(notebook, params, out_dir, log_output)
        except NotebookFailed:
            summary["notebooks"][notebook] = {"status": "failed", "seconds": round(time.perf_counter() - begin, 1)}
            summary["failed"] = notebook
            _write(summary_paths, summary)
            raise
        took = time.perf_counter() - begin
        summary["notebooks"][notebook] = {"status": "ok", "seconds": round(took, 1), "executed": portable(target),
                                          "settings": dict(PROFILES[profile][notebook])}
        print(f"[{notebook}] done in {took:.0f} s -> {target}", flush=True)
        _write(summary_paths, summary)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["finished"] = _now()
    summary["figures_written"] = sorted(p.name for p in figures_dir.glob("*.png")) if figures_dir.is_dir() else []
    if summary["figures_written"]:
        from .plots import write_figure_index  # matplotlib: only when there are figures to index
        write_figure_index(figures_dir)  # after the last notebook: every figure's record as it now is
    _write(summary_paths, summary)
    print(f"done in {summary['wall_seconds']:.0f} s; {len(summary['figures_written'])} figures in {figures_dir}; "
          f"summary {summary_paths[0]}", flush=True)
    return summary


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def portable(path: Path) -> str:
    """``path`` relative to the checkout (``../shared/data``, ``figures``): records carry no machine's paths."""
    return os.path.relpath(path, repo_root())


def _write(paths: Sequence[Path], summary: dict[str, Any]) -> None:
    for path in paths:
        atomic_write(path, lambda f: f.write(json.dumps(summary, indent=2, default=str).encode() + b"\n"))


# ----------------------------------------------------------------------------- the command

def _cmd_reproduce(args: argparse.Namespace) -> int:
    if args.reuse_host_memory:  # this program's kernels: glibc reads these when a process starts
        os.environ.update(HOST_MEMORY_ENV)
    try:
        reproduce(args.profile, args.only, args.out, args.figures, args.data_root, args.threads, args.log_output,
                  args.fresh)
    except NotebookFailed as failure:
        print(f"heterofl reproduce: {failure}", file=sys.stderr)
        return 1
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``heterofl reproduce`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "reproduce", help="execute the notebooks with papermill and write the paper's figures",
        description=f"Executes the notebooks (notebooks/{NOTEBOOKS[0][:2]}-{NOTEBOOKS[-1][:2]}) at a profile's scale "
                    "(papermill), keeps the executed copies in "
                    "<out>/notebooks, runs every experiment into <out>/runs (finished runs are read back and "
                    "skipped, interrupted ones continue), and writes the figures (PNG, PDF and a JSON record each) "
                    "to the figures folder. Profiles: smoke (every notebook in minutes, for CI), workshop (each "
                    "notebook in at most 4 minutes on a 2-core laptop), quick (the figures on a laptop CPU, reduced "
                    "as each figure says), paper (the paper's settings; a GPU, hours to days).")
    parser.add_argument("--profile", required=True, choices=list(PROFILES),
                        help="smoke (CI), workshop (each notebook <= 4 min on a laptop), quick (the figures) "
                             "or paper (the paper's settings)")
    parser.add_argument("--only", action="append", metavar="NAMES",
                        help="comma-separated notebooks to run: numbers (03), names (06_mnist_cnn) or words (mnist); "
                             "repeatable (default: all, in order)")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for runs/ and the executed notebooks/ (default ./reproduction); with --out, "
                             "figures go to DIR/figures unless --figures says otherwise")
    parser.add_argument("--figures", metavar="DIR", help="folder for the figures (default ./figures; with --out, "
                                                         "or for smoke, <out>/figures)")
    parser.add_argument("--data-root", metavar="DIR",
                        help=f"where datasets live ({DATA_ROOT_RULE})")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads per notebook kernel (sets OMP_NUM_THREADS; 1 is fastest on a CPU "
                             "shared with other busy processes)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")
    parser.add_argument("--reuse-host-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="the notebook kernels keep freed host memory for reuse (glibc), as `heterofl run` "
                             "does: on by default for this program; --no-reuse-host-memory turns it off")
    parser.add_argument("--fresh", action="store_true",
                        help="delete <out>/runs first and train every run again (default: finished runs are read "
                             "back; a change to the code that makes results retrains on its own)")
    parser.set_defaults(handler=_cmd_reproduce)
    return parser
