"""The notebooks' exercise checker, and the shape every notebook keeps (parameters, summary, exercises)."""

from __future__ import annotations

import nbformat
import numpy as np
import pytest
import torch

from heterofl_core.data import repo_root
from heterofl_core.exercises import check
from heterofl_core.profiles import NOTEBOOKS


def test_check_accepts_equal_answers_within_tolerance():
    assert check("numbers", 0.1 + 0.2, 0.3)
    assert check("tensor vs array", torch.tensor([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]))
    assert check("nested", {"a": [1, 2.0]}, {"a": [1, 2.0]})
    assert check("text", "a2-e8", "a2-e8")


def test_check_says_not_attempted_for_none(capsys):
    assert check("open", None, 3) is False
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("answer, expected", [(3, 4), (torch.ones(2), torch.ones(3)), ("a1", "b1"), ({"a": 1}, {"b": 1})])
def test_check_fails_a_wrong_answer_saying_what_was_expected(answer, expected):
    with pytest.raises(AssertionError, match="Expected"):
        check("wrong", answer, expected)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_every_notebook_has_one_parameters_cell_that_names_only_the_profile_and_paths(notebook):
    nb = nbformat.read(repo_root() / "notebooks" / f"{notebook}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "one cell tagged parameters"
    names = {line.split("=")[0].strip() for line in cells[0].source.splitlines() if "=" in line and not line.startswith("#")}
    assert names == {"profile", "overrides", "data_root", "out_dir", "figures_dir", "interactive"}, names
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "committed without outputs"


@pytest.mark.parametrize("notebook", NOTEBOOKS[1:])
def test_every_notebook_from_01_ends_with_a_summary_and_two_to_four_exercises_with_solutions(notebook):
    nb = nbformat.read(repo_root() / "notebooks" / f"{notebook}.ipynb", as_version=4)
    text = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert any(t.lstrip("# ").lower().startswith("summary") for t in text), "a summary section"
    exercises = [t for t in text if t.lstrip("# ").lower().startswith("exercise")]
    solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert 2 <= len(exercises) <= 4, f"{len(exercises)} exercises"
    assert len(solutions) == len(exercises), "one solution cell per exercise"
    assert all(c.metadata.get("jupyter", {}).get("source_hidden") for c in solutions), "solutions start collapsed"
    assert all("check(" in c.source for c in solutions), "every solution checks itself"
