"""Judging logic (pure: no Ray, no Serve): rule judges, pairwise verdicts, position swap,
and the LLM judge's prompt and answer parsing. The Serve apps (`raydpo.judge.apps`,
`raydpo.judge.llm`) only schedule these functions."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from raydpo.records import Judgement, Preferred

# Score gaps are differences of floats: 0.55 - 0.5 is 0.0500000000000000444, which
# must still count as "at or below" a tie margin of 0.05.
TIE_EPS = 1e-9


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


# ------------------------------------------------------------------ pairwise LLM judges

DEFAULT_TEMPLATE = (
    "Which response answers the request better?\n\nRequest:\n{prompt}\n\n"
    "Response A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
    "Answer with one letter, A or B.\nAnswer:"
)
DEFAULT_ANSWER_PATTERN = r"\b([AB])\b"


def render_judge_prompt(template: str, prompt: str, response_a: str, response_b: str) -> str:
    """The judge model's input; the template names {prompt}, {response_a}, {response_b}."""
    return template.format(prompt=prompt, response_a=response_a, response_b=response_b)


PAIRWISE_FIELDS = ("prompt", "response_a", "response_b")
RUBRIC_FIELDS = ("prompt", "response")  # a pointwise judge's rubric


def check_template(template: str, fields: tuple[str, ...] = PAIRWISE_FIELDS, key: str = "judge.template") -> None:
    import string

    names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    missing = set(fields) - names
    extra = names - set(fields)
    if missing or extra:
        raise ValueError(f"{key} must use {', '.join('{' + f + '}' for f in fields)} and nothing else"
                         f"{'; missing ' + str(sorted(missing)) if missing else ''}"
                         f"{'; unknown ' + str(sorted(extra)) if extra else ''}")


def parse_verdict(text: str, pattern: str, answers: dict[str, str]) -> Preferred:
    """The first match of `pattern` (its first group) looked up in `answers`
    (e.g. {"A": "a", "B": "b"}): "a", "b", or "invalid" when nothing usable matches.
    Never a default side: an unparseable answer is counted by the caller."""
    import re

    m = re.search(pattern, text)
    if not m:
        return "invalid"
    return answers.get(m.group(1) if m.groups() else m.group(0), "invalid")
