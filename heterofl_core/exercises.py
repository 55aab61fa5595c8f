"""Self-checking exercises in the notebooks.

An exercise cell leaves the learner's answer as ``None`` until they write it;
:func:`check` then says "not attempted yet" instead of failing, so a notebook still
runs top to bottom. A wrong answer fails with a message that says what was
expected. Each exercise's solution sits in a collapsed cell tagged ``solution``
right after it (click it to reveal); it calls :func:`check` too, so running the
notebook (``heterofl reproduce``) tests every solution.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def check(name: str, answer: Any, expected: Any, *, rtol: float = 1e-6, atol: float = 1e-8) -> bool:
    """True when ``answer`` equals ``expected`` (numbers, arrays and tensors within tolerance);
    False with a note when it is None (not attempted); AssertionError when it is wrong."""
    if answer is None:
        print(f"{name}: not attempted yet. Write your answer in the cell above, or reveal the solution below.")
        return False
    assert _same(answer, expected, rtol, atol), f"{name}: not yet. Expected {_show(expected)}, got {_show(answer)}."
    print(f"{name}: correct.")
    return True


def _same(answer: Any, expected: Any, rtol: float, atol: float) -> bool:
    if isinstance(expected, (torch.Tensor, np.ndarray)) or isinstance(answer, (torch.Tensor, np.ndarray)):
        a, e = np.asarray(_numpy(answer), dtype=float), np.asarray(_numpy(expected), dtype=float)
        return a.shape == e.shape and bool(np.allclose(a, e, rtol=rtol, atol=atol))
    if isinstance(expected, float) or isinstance(answer, float):
        return isinstance(answer, (int, float)) and math.isclose(answer, expected, rel_tol=rtol, abs_tol=atol)
    if isinstance(expected, dict):
        return isinstance(answer, dict) and answer.keys() == expected.keys() and all(
            _same(answer[k], expected[k], rtol, atol) for k in expected)
    if isinstance(expected, (list, tuple)):
        return isinstance(answer, (list, tuple)) and len(answer) == len(expected) and all(
            _same(a, e, rtol, atol) for a, e in zip(answer, expected))
    return answer == expected


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _show(value: Any) -> str:
    text = repr(_numpy(value))
    return text if len(text) <= 200 else text[:200] + " ..."
