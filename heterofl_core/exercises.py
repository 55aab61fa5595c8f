"""The notebooks' exercises: checks that hint, predictions recorded before a run, solutions run on purpose.

Every exercise is one code cell tagged ``exercise`` and its kind:

- ``write``: the learner writes a function; :func:`check_function` calls it beside the library on
  random inputs and says on which input they differ;
- ``predict``: the learner writes a guess and a one-line reason before a run (:func:`predict`); after
  the run :meth:`Prediction.compare` puts the outcome beside it, graded only where the outcome is
  settled (not within the noise of seeds);
- ``read``: the learner reads or works out a value from what the notebook showed (:func:`check`).

A check prints one line and raises nothing: "not attempted yet", "correct", or "not yet" with a hint
(what to look at, what form the answer takes), never the expected value. Each solution is a collapsed
Markdown cell tagged ``solution`` after its exercise, so Run All never executes it and it touches none of
the learner's variables; a learner opens it on purpose. ``heterofl reproduce`` runs every solution after
its exercise (:func:`run_solution`), in a copy of the notebook's namespace and with :func:`strict` checks,
so a solution that no longer passes stops the reproduction.
"""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import torch

KINDS = ("write", "predict", "read")  # the tag beside ``exercise`` on every exercise cell
SOLUTION_SUMMARY = re.compile(r"<summary><b>Solution to (?P<title>[^<]+)</b>")
SOLUTION_CODE = re.compile(r"```python\n(?P<code>.*?)\n```", re.S)

_strict: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("strict_exercises", default=None)


class ExerciseFailed(AssertionError):
    """A check failed while checks are strict (:func:`strict`): a solution that does not pass."""


@contextmanager
def strict() -> Iterator[list[str]]:
    """Within the block a failing or unattempted check raises :class:`ExerciseFailed`; yields the list of
    the checks that passed (how :func:`run_solution` knows a solution checked itself)."""
    passed: list[str] = []
    token = _strict.set(passed)
    try:
        yield passed
    finally:
        _strict.reset(token)


def _say(name: str, verdict: str, ok: bool | None) -> bool:
    """Print one line; under :func:`strict`, raise unless ``ok``."""
    passed = _strict.get()
    if passed is not None:
        if not ok:
            raise ExerciseFailed(f"{name}: {verdict}")
        passed.append(name)
    print(f"{name}: {verdict}")
    return bool(ok)


NOT_ATTEMPTED = "not attempted yet: write your answer in the cell above and run it again."


# ----------------------------------------------------------------------------- read: a value

def check(name: str, answer: Any, expected: Any, *, hint: str = "", rtol: float = 1e-6,
          atol: float = 1e-8) -> bool:
    """Compare ``answer`` with ``expected`` (numbers, arrays, tensors within ``rtol``/``atol``; lists,
    tuples and dicts entry by entry); print one line. ``None`` is "not attempted". A wrong answer gets
    ``hint`` and what form the answer takes, never the expected value."""
    if answer is None:
        return _say(name, NOT_ATTEMPTED, None)
    if _same(answer, expected, rtol, atol):
        return _say(name, "correct.", True)
    form = _form_hint(answer, expected)
    return _say(name, "not yet. " + " ".join(part for part in (form, hint) if part), False)


def _same(answer: Any, expected: Any, rtol: float, atol: float) -> bool:
    if isinstance(expected, (torch.Tensor, np.ndarray)) or isinstance(answer, (torch.Tensor, np.ndarray)):
        try:
            a, e = np.asarray(_numpy(answer), dtype=float), np.asarray(_numpy(expected), dtype=float)
        except (TypeError, ValueError):
            return False
        return a.shape == e.shape and bool(np.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True))
    if _is_number(expected) and not isinstance(expected, bool):
        return _is_number(answer) and not isinstance(answer, bool) and math.isclose(
            float(answer), float(expected), rel_tol=rtol, abs_tol=atol)
    if isinstance(expected, Mapping):
        return isinstance(answer, Mapping) and set(answer) == set(expected) and all(
            _same(answer[k], expected[k], rtol, atol) for k in expected)
    if isinstance(expected, (list, tuple)):
        return isinstance(answer, (list, tuple)) and len(answer) == len(expected) and all(
            _same(a, e, rtol, atol) for a, e in zip(answer, expected))
    return bool(answer == expected)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) or (
        isinstance(value, torch.Tensor) and value.numel() == 1)


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "True or False"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a dict"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return "an array or tensor"
    return f"a {type(value).__name__}"


def _form_hint(answer: Any, expected: Any) -> str:
    """What form the answer should take, where the answer's form differs (never its value)."""
    if isinstance(expected, (torch.Tensor, np.ndarray)):
        shape = tuple(np.shape(_numpy(expected)))
        try:
            got = tuple(np.shape(_numpy(answer)))
        except (TypeError, ValueError):
            got = None
        return f"The answer has shape {shape}; yours has {got}." if got != shape else ""
    if _kind(answer) != _kind(expected):
        return f"The answer is {_kind(expected)}; yours is {_kind(answer)}."
    if isinstance(expected, Mapping) and set(answer) != set(expected):
        return f"The answer's keys are {sorted(map(str, expected))}."
    if isinstance(expected, (list, tuple)) and len(answer) != len(expected):
        return "Your list has a different length from the answer's."
    return ""


# ----------------------------------------------------------------------------- write: a function

@dataclass(frozen=True)
class Case:
    """One input a written function is called on: its arguments, how to name it in a hint, and (optional)
    the library's result for it, when the library computes it from more than these arguments."""

    args: tuple[Any, ...]
    label: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    expected: Any = None


def check_function(name: str, function: Callable[..., Any] | None, reference: Callable[..., Any] | None,
                   cases: Sequence[Case], *, hint: str = "", rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Call the learner's ``function`` and the library's ``reference`` on every case (random inputs, made
    by the notebook; a case's ``expected``, when given, stands for the reference) and compare the results as
    :func:`check` does. A function that returns ``None`` (the stub) is "not attempted"; one that raises, or
    differs, is told on which case (its label), never what the reference returned."""
    if function is None:
        return _say(name, NOT_ATTEMPTED, None)
    for number, case in enumerate(cases, 1):
        where = f"case {number} of {len(cases)}" + (f" ({case.label})" if case.label else "")
        try:
            got = function(*case.args, **case.kwargs)
        except Exception as error:  # the learner's code: one line, not a traceback
            return _say(name, f"not yet. On {where} your function raised {type(error).__name__}: {error}", False)
        if got is None:
            return _say(name, NOT_ATTEMPTED if number == 1 else f"not yet. On {where} your function returned None.",
                        None if number == 1 else False)
        want = case.expected if case.expected is not None else reference(*case.args, **case.kwargs)
        if not _same(got, want, rtol, atol):
            form = _form_hint(got, want)
            return _say(name, f"not yet. Your function differs from the library on {where}. "
                              + " ".join(part for part in (form, hint) if part), False)
    return _say(name, "correct." if len(cases) == 1 else f"correct on all {len(cases)} cases.", True)


# ----------------------------------------------------------------------------- predict, then run

@dataclass(frozen=True)
class Prediction:
    """A guess and its reason, written before a run; :meth:`compare` sets the outcome beside it."""

    name: str
    guess: Any
    reason: str
    recorded: str

    def compare(self, outcome: Any, *, settled: bool = True, about: str = "", rtol: float = 1e-6) -> bool | None:
        """Print the guess beside ``outcome``. ``settled``: the outcome is beyond noise (deterministic, or
        beyond the spread of seeds), so a guess is right or wrong (a number within ``rtol`` of it matches);
        otherwise it is neither, and the line says so. ``about``: what the outcome is, in a few words. Returns
        whether the guess matched (None: not made or not settled)."""
        if self.guess is None:
            _say(self.name, "no prediction was recorded: write your guess and reason above, run that cell, then "
                            "this one.", None)
            return None
        said = f"you predicted {_show(self.guess)}" + (f" ({self.reason})" if self.reason else "")
        result = f"{about + ': ' if about else ''}the run gave {_show(outcome)}"
        if not settled:
            _say(self.name, f"{said}; {result}. That outcome is within the noise of this run (see the text), so "
                            f"neither a match nor a miss says much: compare your reason with what the run shows.", True)
            return None
        matched = _same(self.guess, outcome, rtol, 1e-8)
        verdict = "as you predicted." if matched else "not what you predicted: what did your reason miss?"
        return _say(self.name, f"{said}; {result}: {verdict}", matched)


def predict(name: str, guess: Any, reason: str = "") -> Prediction:
    """Record a guess and a one-line reason before the run that decides it (printed back with the time)."""
    recorded = datetime.now().strftime("%H:%M:%S")
    if guess is None:
        _say(name, "no guess yet: write your guess and a one-line reason, then run this cell before the run "
                   "below.", None)
    elif not reason.strip():
        _say(name, f"guess {_show(guess)} recorded at {recorded}; add a one-line reason (why you expect it).", True)
    else:
        _say(name, f"guess {_show(guess)} recorded at {recorded}, because {reason.strip()}", True)
    return Prediction(name, guess, reason.strip(), recorded)


def _show(value: Any) -> str:
    value = _numpy(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    text = repr(value)
    return text if len(text) <= 240 else text[:240] + " ..."


# ----------------------------------------------------------------------------- solutions

def solution_code(markdown: str) -> tuple[str, str]:
    """(exercise title, code) of a solution cell: ``<details><summary><b>Solution to TITLE</b>`` and one
    fenced ``python`` block."""
    title, code = SOLUTION_SUMMARY.search(markdown), SOLUTION_CODE.search(markdown)
    if title is None or code is None:
        raise ValueError("a solution cell is <details><summary><b>Solution to TITLE</b>...</summary> with one "
                         "```python block inside")
    return title["title"].strip(), code["code"]


def run_solution(title: str, code: str, namespace: Mapping[str, Any]) -> None:
    """Run a solution's ``code`` in a copy of ``namespace`` (the notebook's variables stay as they were) with
    strict checks: raises :class:`ExerciseFailed` when a check fails, or when the solution checks nothing."""
    scope = dict(namespace)
    with strict() as passed:
        exec(compile(code, f"<solution to {title}>", "exec"), scope)  # noqa: S102 (the notebook's own code)
    if not passed:
        raise ExerciseFailed(f"the solution to {title} checks nothing: it must call check, check_function or "
                             f"predict(...).compare")
    print(f"[reproduce] the solution to {title} passed its {len(passed)} check{'s' * (len(passed) > 1)}")
