"""A hosted notebook (Colab, a JupyterHub, Binder) without this project: the set-up cell installs it.

Proved offline: a fresh virtual environment in which ``heterofl_core`` is not importable, sharing this
environment's packages (torch, the Jupyter kernel, papermill: no download), runs notebook 01 through papermill
with ``HETEROFL_SOURCE`` naming a wheel built here; its set-up cell installs the wheel and the notebook finishes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import nbformat
import papermill
import pytest

from heterofl_core.data import repo_root

pytestmark = pytest.mark.slow
PACKAGED = {"pyproject.toml", "README.md", "LICENSE", "heterofl_core", "heterofl_flower"}  # what the wheel is built from


def test_a_fresh_environment_installs_the_project_and_runs_notebook_01(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # built from a copy of the package's sources: a build writes build/ and *.egg-info beside them, which must not
    # land in the checkout (an egg-info there shadows the installed package's metadata, entry points included)
    source = tmp_path / "source"
    shutil.copytree(repo_root(), source, ignore=lambda folder, names: [n for n in names if n not in PACKAGED]
                    if Path(folder) == repo_root() else shutil.ignore_patterns("__pycache__")(folder, names))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(source)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("heterofl-*.whl")

    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    purelib = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      text=True).strip()
    # this environment's packages, as plain paths: their .pth files (this checkout's editable install) stay off
    shared = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "shared_from_the_test.pth").write_text(shared + "\n")
    # nothing from outside the fresh environment either: no PYTHONPATH (a CI may set one), no user site-packages
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("PYTHONHOME", raising=False)
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    probe = "import importlib.util; spec = importlib.util.find_spec('heterofl_core'); print(spec and spec.origin)"
    found = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "None", f"heterofl_core must be missing, found {found.stdout.strip()}"
    assert subprocess.run([python, "-c", "import torch, ipykernel"], cwd=tmp_path).returncode == 0

    jupyter = fresh / "share" / "jupyter"
    subprocess.run([python, "-m", "ipykernel", "install", "--prefix", str(fresh), "--name", "fresh"], check=True,
                   capture_output=True, cwd=tmp_path)
    for name, value in (("JUPYTER_PATH", str(jupyter)), ("HETEROFL_SOURCE", str(wheel)), ("HOME", str(tmp_path)),
                        # offline, and the dependencies are this environment's (shared above): pip adds none
                        ("PIP_NO_INDEX", "1"), ("PIP_NO_DEPS", "1"), ("PIP_DISABLE_PIP_VERSION_CHECK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HETEROFL_DATA", raising=False)
    out = tmp_path / "01.ipynb"
    papermill.execute_notebook(str(repo_root() / "notebooks" / "01_width_slicing.ipynb"), str(out),
                               kernel_name="fresh", cwd=str(tmp_path), progress_bar=False)
    cells = nbformat.read(out, as_version=4).cells
    printed = ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in cells if c.cell_type == "code"]
    assert any(f"installing {wheel}" in text for text in printed[:3]), "the set-up cell installed the project"
    assert "all checks passed" in printed[-1]
    shown = subprocess.run([python, "-m", "pip", "show", "heterofl"], capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0 and str(fresh) in shown.stdout, "installed into the fresh environment"
