"""Run folders: the code version recorded with every run and figure."""

from __future__ import annotations

import subprocess

from heterofl_core.runs import code_version


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
