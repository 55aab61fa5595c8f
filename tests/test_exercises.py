"""The notebooks' exercises: checks that hint and never tell, predictions, solutions that Run All never
executes (and the reproduction always does), and the shape every notebook keeps."""

from __future__ import annotations

import re

import nbformat
import numpy as np
import pytest
import torch

from heterofl_core.data import repo_root
from heterofl_core.exercises import (KINDS, Case, ExerciseFailed, check, check_function, predict, run_solution,
                                     solution_code, strict)
from heterofl_core.profiles import NOTEBOOKS
from heterofl_core.reproduce import with_solutions_run

NOTEBOOK_DIR = repo_root() / "notebooks"


def cells(notebook: str) -> list[nbformat.NotebookNode]:
    return nbformat.read(NOTEBOOK_DIR / f"{notebook}.ipynb", as_version=4).cells


def tags(cell: nbformat.NotebookNode) -> list[str]:
    return cell.metadata.get("tags", [])


# ----------------------------------------------------------------------------- the checker

def test_check_accepts_right_answers_within_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    assert check("numbers", 0.1 + 0.2, 0.3)
    assert check("int for a float", 3, 3.0)
    assert check("numpy scalar", np.float64(2.5), 2.5)
    assert check("tensor vs array", torch.tensor([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]))
    assert check("nested", {"a": [1, 2.0]}, {"a": [1, 2.0]})
    assert check("text", "a2-e8", "a2-e8")
    assert check("stated rounding", 2.30, 2.2974, rtol=0, atol=0.005), "an answer rounded as the wording says"
    assert capsys.readouterr().out.count("correct.") == 7


def test_check_says_not_attempted_for_none(capsys: pytest.CaptureFixture[str]) -> None:
    assert check("open", None, 3) is False
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("answer, expected", [
    (3, 4.7125), (0, 123456), (torch.ones(2), torch.tensor([0.25, 0.75, 1.5])), ("a1", "b7-e3"),
    ({"a": 1}, {"head[8, 0]": 4.0}), ([0, 1], [32, 33, 34]), (0, "c5-e5"), (0.0, [8, 9, 10, 11]), (True, 0.123)])
def test_a_wrong_answer_prints_one_line_that_never_contains_the_expected_value(
        answer: object, expected: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert check("Exercise 1", answer, expected, hint="look at the count row") is False  # no exception
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("Exercise 1: not yet.") and "look at the count row" in out
    shown = [repr(expected), str(expected)] + ([repr(v) for v in np.ravel(np.asarray(expected, dtype=object))]
                                               if not isinstance(expected, dict) else [repr(expected["head[8, 0]"])])
    if isinstance(expected, torch.Tensor):
        shown = [f"{v:g}" for v in expected.tolist()] + [str(expected.tolist())]
    for text in shown:
        assert text not in out.split(":", 1)[1], f"{text!r} given away in {out!r}"


def test_a_wrong_answer_says_what_form_the_answer_takes(capsys: pytest.CaptureFixture[str]) -> None:
    check("shape", torch.ones(2), torch.ones(3))
    check("kind", "7", 7)
    check("keys", {"a": 1}, {"b": 1})
    out = capsys.readouterr().out
    assert "shape (3,)" in out and "is a number; yours is a string" in out and "keys are ['b']" in out


def test_strict_checks_raise_on_wrong_and_unattempted_answers() -> None:
    with strict() as passed:
        check("right", 1, 1)
        with pytest.raises(ExerciseFailed, match="not yet"):
            check("wrong", 2, 1)
        with pytest.raises(ExerciseFailed, match="not attempted"):
            check("open", None, 1)
    assert passed == ["right"]


# ----------------------------------------------------------------------------- write: a function

def reference_prefix(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:n]


CASES = [Case((torch.randn(6, generator=torch.Generator().manual_seed(k)), n), f"n = {n}") for k, n in enumerate((1, 3, 6))]


def test_check_function_accepts_a_right_function_on_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_function("Exercise 2", lambda x, n: x[:n].clone(), reference_prefix, CASES)
    assert "correct on all 3 cases" in capsys.readouterr().out


def test_check_function_names_the_case_and_never_the_reference_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert not check_function("Exercise 2", lambda x, n: x[:max(n, 3)], reference_prefix, CASES, hint="n entries")
    out = capsys.readouterr().out
    assert "case 1 of 3 (n = 1)" in out and "n entries" in out and "shape (1,)" in out
    assert f"{CASES[0].args[0][0].item():.4f}"[:6] not in out


def test_check_function_reports_the_learners_error_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert not check_function("Exercise 2", lambda x, n: x.missing(), reference_prefix, CASES)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "raised AttributeError" in out


def test_check_function_treats_the_stub_as_not_attempted(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_function("Exercise 2", lambda x, n: None, reference_prefix, CASES) is False
    assert check_function("Exercise 2", None, reference_prefix, CASES) is False
    assert capsys.readouterr().out.count("not attempted") == 2


# ----------------------------------------------------------------------------- predict, then run

def test_a_prediction_is_compared_after_the_run_and_graded_only_when_settled(capsys: pytest.CaptureFixture[str]) -> None:
    guess = predict("Exercise 3", "c1", "the widest model learns most")
    assert "recorded" in capsys.readouterr().out
    assert guess.compare("c1") is True and guess.compare("e1") is False
    assert guess.compare("e1", settled=False) is None
    out = capsys.readouterr().out.splitlines()
    assert "as you predicted" in out[0] and "not what you predicted" in out[1] and "noise" in out[2]
    assert predict("Exercise 3", None).compare("c1") is None


def test_a_prediction_without_a_reason_asks_for_one(capsys: pytest.CaptureFixture[str]) -> None:
    predict("Exercise 3", 0.5)
    assert "add a one-line reason" in capsys.readouterr().out


# ----------------------------------------------------------------------------- solutions

def test_run_solution_runs_in_a_copy_of_the_namespace_with_strict_checks() -> None:
    namespace = {"check": check, "x": 1}
    run_solution("Exercise 1", "x = 2\ncheck('Exercise 1', x, 2)", namespace)
    assert namespace["x"] == 1, "the notebook's variables stay as they were"
    with pytest.raises(ExerciseFailed, match="not yet"):
        run_solution("Exercise 1", "check('Exercise 1', 3, 2)", namespace)
    with pytest.raises(ExerciseFailed, match="checks nothing"):
        run_solution("Exercise 1", "y = 1", namespace)


def test_solution_code_reads_the_title_and_the_code() -> None:
    source = ("<details><summary><b>Solution to Exercise 2</b> (open it once you have tried)</summary>\n\n"
              "```python\nanswer = 1\ncheck('Exercise 2', answer, 1)\n```\n\n</details>")
    assert solution_code(source) == ("Exercise 2", "answer = 1\ncheck('Exercise 2', answer, 1)")
    with pytest.raises(ValueError, match="Solution to TITLE"):
        solution_code("just text")


# ----------------------------------------------------------------------------- the notebooks' exercises

@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_every_notebook_has_one_parameters_cell_that_names_only_the_profile_and_paths(notebook: str) -> None:
    tagged = [c for c in cells(notebook) if "parameters" in tags(c)]
    assert len(tagged) == 1, "one cell tagged parameters"
    names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line and not line.startswith("#")}
    assert names == {"profile", "overrides", "data_root", "out_dir", "figures_dir", "interactive"}, names


@pytest.mark.parametrize("notebook", NOTEBOOKS[1:])
def test_every_notebook_from_01_ends_with_a_summary_and_exercises_that_are_mostly_write_or_predict(notebook: str) -> None:
    nb = cells(notebook)
    text = [c.source for c in nb if c.cell_type == "markdown"]
    assert any(t.lstrip("# ").lower().startswith("summary") for t in text), "a summary section"
    exercises = [c for c in nb if "exercise" in tags(c)]
    kinds = [next((k for k in KINDS if k in tags(c)), None) for c in exercises]
    assert 2 <= len(exercises) <= 5, f"{len(exercises)} exercises"
    assert None not in kinds and all(c.cell_type == "code" for c in exercises), "each a code cell tagged with its kind"
    doing = sum(kind in ("write", "predict") for kind in kinds)
    assert doing * 2 >= len(exercises), f"{doing} of {len(exercises)} exercises are write or predict: at least half"
    headings = [line for t in text for line in t.splitlines() if re.match(r"#+ Exercise \d+ \((write|predict|read)\)", line)]
    assert len(headings) == len(exercises), "one heading per exercise, with its kind"


@pytest.mark.parametrize("notebook", NOTEBOOKS[1:])
def test_every_exercise_has_a_solution_that_run_all_never_executes(notebook: str) -> None:
    nb = cells(notebook)
    solutions = [c for c in nb if "solution" in tags(c)]
    exercises = [c for c in nb if "exercise" in tags(c)]
    assert len(solutions) == len(exercises), "one solution per exercise"
    assert all(c.cell_type == "markdown" for c in solutions), "a Markdown cell: Run All never executes it"
    titles = [solution_code(c.source)[0] for c in solutions]
    for exercise, title in zip(exercises, titles):
        assert f'"{title}"' in exercise.source, f"{title}: the exercise cell checks under the same name"
    for cell in solutions:
        title, code = solution_code(cell.source)
        compile(code, title, "exec")
        assert re.search(r"\b(check|check_function|compare)\(", code), f"the solution to {title} checks itself"
    for position, cell in enumerate(nb):
        if "exercise" in tags(cell):
            later = nb[position + 1:]
            assert any("solution" in tags(c) for c in later), "the solution comes after its exercise"


def test_the_reproduction_runs_every_solution_after_its_exercise() -> None:
    nb = with_solutions_run(NOTEBOOK_DIR / "02_aggregation.ipynb")
    for position, cell in enumerate(nb.cells):
        if "solution" in tags(cell):
            run = nb.cells[position + 1]
            title, code = solution_code(cell.source)
            assert run.cell_type == "code" and "solution-run" in tags(run)
            assert f"run_solution({title!r}, {code!r}, globals())" in run.source


# ----------------------------------------------------------------------------- executed as a learner, and as the reproduction

def test_a_learners_run_all_executes_no_solution(tmp_path) -> None:
    """papermill with no parameters: notebook 02 as a learner's Run All (the workshop profile; it needs no data)."""
    import papermill

    from heterofl_core.reproduce import KERNEL

    out = tmp_path / "02.ipynb"
    papermill.execute_notebook(str(NOTEBOOK_DIR / "02_aggregation.ipynb"), str(out), kernel_name=KERNEL,
                               cwd=str(tmp_path), progress_bar=False)
    executed = nbformat.read(out, as_version=4)
    solutions = [c for c in executed.cells if "solution" in tags(c)]
    assert solutions and all(not c.get("outputs") and c.get("execution_count") is None for c in solutions)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "not attempted yet" in printed and "correct" not in printed.replace("not attempted", ""), \
        "the learner's exercises wait for an answer; no solution ran"


def test_a_wrong_solution_stops_the_reproduction(tmp_path) -> None:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from heterofl_core.reproduce import KERNEL

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": KERNEL, "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("from heterofl_core.exercises import check\nanswer = None\n"
                                          "check('Exercise 1', answer, 4)", metadata={"tags": ["exercise", "read"]}),
                nbformat.v4.new_markdown_cell("<details><summary><b>Solution to Exercise 1</b></summary>\n\n"
                                              "```python\nanswer = 5\ncheck('Exercise 1', answer, 4)\n```\n\n</details>",
                                              metadata={"tags": ["solution"]})]
    path = tmp_path / "wrong.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(PapermillExecutionError, match="ExerciseFailed"):
        papermill.execute_notebook(with_solutions_run(path), str(tmp_path / "out.ipynb"), kernel_name=KERNEL,
                                   progress_bar=False)
