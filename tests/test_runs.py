"""Run folders: the code versions recorded with every run and figure, and the cache key that follows them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from heterofl_core import run_cache
from heterofl_core.config import parse_control
from heterofl_core.experiments import Results
from heterofl_core.run_cache import DataSpec, Experiment
from heterofl_core.runs import PRESENTATION_MODULES, RESULT_MODULES, code_version, results_version


def test_code_version_is_dirty_for_code_changes_only(tmp_path):
    """Edited package or notebook files mark the version dirty; outputs such as figures/ do not."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for name in ("pkg/code.py", "notebooks/n.ipynb", "figures/f.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("1")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    package = tmp_path / "pkg"
    clean = code_version(package)
    assert "+" in clean and not clean.endswith("-dirty")
    (tmp_path / "figures/f.json").write_text("2")
    assert code_version(package) == clean
    for name in ("notebooks/n.ipynb", "pkg/code.py"):
        (tmp_path / name).write_text("2")
        assert code_version(package) == clean + "-dirty", name
        git("checkout", "--", name)


def test_results_version_changes_with_result_making_code_only(tmp_path):
    """The run cache's code key: a training module or a model counts, a plotting module does not."""
    package = tmp_path / "pkg"
    (package / "models").mkdir(parents=True)
    for name in ("training.py", "plots.py", "models/__init__.py", "__init__.py", "cohort_rule.json"):
        (package / name).write_text("x = 1\n")
    first = results_version(package)
    (package / "plots.py").write_text("x = 2\n")
    (package / "__init__.py").write_text("__version__ = '2'\n")
    assert results_version(package) == first, "presentation modules do not retrain"
    for name in ("training.py", "models/__init__.py", "cohort_rule.json"):
        (package / name).write_text(f"changed = {name!r}\n")
        changed = results_version(package)
        assert changed != first, name
        first = changed


def test_a_figure_refuses_runs_of_different_result_making_code(tmp_path):
    folders = []
    for n, version in enumerate(["aaa", "bbb"]):
        folder = tmp_path / f"run{n}"
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps({"code_version": f"0.1.0+{version}", "results_version": version}))
        folders.append(str(folder))
    results = Results(pd.DataFrame({"folder": folders}), pd.DataFrame(), [], 0.0)
    with pytest.raises(ValueError, match="different code"):
        results.trained_with()
    assert [v["results_version"] for v in results.trained_with(allow_mixed=True)] == ["aaa", "bbb"]
    same = Results(pd.DataFrame({"folder": [folders[0], folders[0]]}), pd.DataFrame(), [], 0.0)
    assert same.trained_with() == [{"code_version": "0.1.0+aaa", "results_version": "aaa"}]


def test_an_experiment_key_follows_the_result_making_code(monkeypatch):
    experiment = Experiment("a1", parse_control("1_10_0.5_iid_fix_a1_bn_1_1", "MNIST"), DataSpec("MNIST", "/x", 100, 10))
    key = experiment.key
    monkeypatch.setattr(run_cache, "results_version", lambda: "other code")
    assert experiment.key != key, "a change of that code gives the run a folder of its own, so it retrains"


def test_every_file_of_the_package_is_declared_results_or_presentation():
    """So the run cache's key can never miss a module: a new file must be declared one way or the other."""
    package = Path(run_cache.__file__).parent
    files = {str(p.relative_to(package)) for p in package.rglob("*") if p.suffix in (".py", ".json")
             and "__pycache__" not in p.parts}
    assert not RESULT_MODULES & PRESENTATION_MODULES
    assert files == RESULT_MODULES | PRESENTATION_MODULES, (
        f"declare in heterofl_core/runs.py: {sorted(files - RESULT_MODULES - PRESENTATION_MODULES)}; "
        f"gone: {sorted((RESULT_MODULES | PRESENTATION_MODULES) - files)}")


def test_the_notebooks_grids_and_captions_are_presentation_and_the_data_subset_is_not():
    assert "experiments.py" in PRESENTATION_MODULES, "editing a caption or a grid retrains nothing"
    assert "run_cache.py" in RESULT_MODULES, "DataSpec and subset cut the data a run trains on"
