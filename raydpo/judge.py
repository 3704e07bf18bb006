"""Judging logic (pure: no Ray, no Serve): rule judges, pairwise verdicts, position swap.

The Serve deployment (`raydpo.serve_judge`) only schedules these functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

Preferred = str  # "a", "b", "tie" or "invalid"
# Score gaps are differences of floats: 0.55 - 0.5 is 0.0500000000000000444, which
# must still count as "at or below" a tie margin of 0.05.
TIE_EPS = 1e-9


@dataclass(frozen=True)
class Judgement:
    """Verdict on (prompt, response_a, response_b)."""

    preferred: Preferred
    margin: float  # score_a - score_b for scoring judges; +1/-1/0 for pairwise judges
    score_a: float | None
    score_b: float | None


def load_rule(spec: str) -> Callable[[str, str], float]:
    """Import ``module:function`` scoring (prompt, response) -> float."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"judge.rule must look like 'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge.rule {spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"judge.rule {spec!r} is not callable")
    return fn


def compare_scores(score_a: float, score_b: float, tie_margin: float = 0.0) -> Judgement:
    """A scoring judge's verdict: the higher score wins unless within `tie_margin`."""
    margin = score_a - score_b
    preferred = "tie" if abs(margin) <= tie_margin + TIE_EPS else ("a" if margin > 0 else "b")
    return Judgement(preferred, margin, score_a, score_b)


def combine_both_orders(first: Preferred, swapped: Preferred) -> Preferred:
    """A pairwise judge is asked (A, B) and then (B, A) to cancel position bias.

    `first` is its answer for (A, B), `swapped` for (B, A), each "a", "b" or
    "invalid" in the positions it was shown. It prefers A only if it says "a"
    first and "b" swapped; the reverse for B; any disagreement (including a
    judge that always picks the first position) is a tie; an unparseable
    answer in either order is "invalid" (counted by the caller, never a default).
    """
    if "invalid" in (first, swapped):
        return "invalid"
    if first == "a" and swapped == "b":
        return "a"
    if first == "b" and swapped == "a":
        return "b"
    return "tie"
