"""The loop's side of the judge: its Serve deployment handle (no HTTP on the loop's
path), ranking k samples per prompt, and the win rate against fixed samples."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from raydpo.judge.rules import combine_both_orders
from raydpo.records import JudgeInfo, Judgement

MIRROR = {"a": "b", "b": "a", "tie": "tie"}


@dataclass
class JudgeTally:
    """What judging some comparisons showed about the judge, and what it cost.

    Quality, over comparisons asked in both orders: `consistent` ones got the same verdict
    both times (A then B, B then A: "a" then "b"), `ties` were ties after combining the two
    (for an LLM judge that is a disagreement), `invalid` had an unparseable answer.
    Cost (remote judges): orders answered by a request or from the cache, retries, the
    endpoint's token counts, and their price."""

    compared: int = 0
    consistent: int = 0
    ties: int = 0
    invalid: int = 0
    calls: int = 0
    cached: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def add_orders(self, first: str, swapped: str, combined: str) -> None:
        self.compared += 1
        self.consistent += MIRROR.get(first) == swapped
        self.ties += combined == "tie"
        self.invalid += combined == "invalid"

    COST = ("calls", "cached", "retries", "prompt_tokens", "completion_tokens", "cost")

    def add_cost(self, j: Judgement) -> None:
        self.add_usage({name: getattr(j, name) for name in self.COST})

    def add_usage(self, usage: dict) -> None:
        for name in self.COST:
            setattr(self, name, getattr(self, name) + usage.get(name, 0))

    def add(self, other: JudgeTally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def row(self, prefix: str) -> dict:
        """Metrics columns: rates over `compared` (None when nothing was compared both ways)."""
        n = self.compared
        rate = (lambda x: x / n) if n else (lambda x: None)
        return {f"{prefix}consistency": rate(self.consistent), f"{prefix}tie_rate": rate(self.ties),
                f"{prefix}invalid_rate": rate(self.invalid), f"{prefix}calls": self.calls,
                f"{prefix}cache_hits": self.cached, f"{prefix}cache_misses": self.calls,  # a miss is a call
                f"{prefix}retries": self.retries,
                f"{prefix}prompt_tokens": self.prompt_tokens, f"{prefix}completion_tokens": self.completion_tokens,
                f"{prefix}cost": round(self.cost, 6)}


def copeland_scores(k: int, verdicts: dict[tuple[int, int], str]) -> list[float]:
    """Scores of k samples from pairwise verdicts on (i, j), i < j ("a": i better,
    "b": j better, "tie", "invalid"): the share of a sample's *valid* comparisons it won,
    ties counting half (Copeland, normalised). An unparseable verdict is left out for both
    samples, rather than counting as a loss for both; a sample with no valid comparison
    scores NaN and `build_pairs` leaves it out. Lets best-vs-worst pairing run on a judge
    that only compares."""
    won, valid = [0.0] * k, [0] * k
    for (i, j), v in verdicts.items():
        if v not in ("a", "b", "tie"):
            continue
        valid[i] += 1
        valid[j] += 1
        won[i] += 1.0 if v == "a" else 0.5 if v == "tie" else 0.0
        won[j] += 1.0 if v == "b" else 0.5 if v == "tie" else 0.0
    return [w / n if n else float("nan") for w, n in zip(won, valid)]


def _result(response, timeout_s: float | None = None, what: str = "a call"):
    """A judge call's result; a raydpo error raised in the replica (a JudgeError: an endpoint
    that refuses, a tripped circuit breaker) as itself, one line, not Ray's remote traceback.
    A call not answered within `timeout_s` (judge.call_timeout_s) is cancelled and raised as
    a JudgeError: a stuck replica, or one Serve cannot replace, would otherwise hold the loop
    forever, without a line. (Deploying the judge, `serve.run`, still waits without a limit.)"""
    import ray

    from raydpo.errors import JudgeError, RaydpoError

    try:
        return response.result(timeout_s=timeout_s)
    except ray.exceptions.RayTaskError as e:  # first: a replica's own TimeoutError is one too
        if isinstance(e.cause, RaydpoError):
            raise e.cause from None
        raise
    except TimeoutError:
        response.cancel()
        raise JudgeError(f"the judge did not answer {what} within judge.call_timeout_s={timeout_s:g} s (a stuck or "
                         f"unplaceable replica? `serve status` shows the judge app; for a slow judge raise the "
                         f"limit, or 0 for none, and --resume)") from None


class JudgeClient:
    """The judge app through its Serve deployment handle (no HTTP on the loop's path).
    Scoring judges (rule, reward model) score; pairwise judges (llm) compare, in both
    orders inside the app, and rank a prompt's k samples by round-robin comparisons."""

    def __init__(self, handle, timeout_s: float | None = None):
        timeout_s = timeout_s or None  # per call (judge.call_timeout_s); None or 0: no limit
        self.handle, self.timeout_s = handle, timeout_s
        self.info: JudgeInfo = _result(handle.info.remote(), timeout_s, "its info call")
        self.name = self.info.name
        self.pairwise = self.info.pairwise  # a property of the judge, told by the judge

    def _results(self, responses: list, chunk: int, what: str) -> list:
        """Each response's result, in order. On a failure the calls not read yet are cancelled:
        on a cluster the judge app outlives the loop, and a remote judge would go on paying."""
        out = []
        try:
            for r in responses:
                out.append(_result(r, self.timeout_s, f"a call for up to {chunk} {what}"))
        except BaseException:
            for r in responses[len(out) + 1:]:
                r.cancel()
            raise
        return out

    def rank(self, groups: Sequence[Sequence[tuple[str, str]]], tally: JudgeTally | None = None) -> list[list[float]]:
        """A score per (prompt, response) in each group: the judge's scores, or Copeland
        scores from comparing every pair of the group (pairwise judges; what the comparisons
        showed and cost goes into `tally`)."""
        if not self.pairwise:
            flat = self.score([x for g in groups for x in g], tally=tally)
            out, i = [], 0
            for g in groups:
                out.append(flat[i:i + len(g)])
                i += len(g)
            return out
        keys, items = [], []
        for gi, g in enumerate(groups):
            for i in range(len(g)):
                for j in range(i + 1, len(g)):
                    keys.append((gi, i, j))
                    items.append((g[i][0], g[i][1], g[j][1]))
        verdicts = self._compare(items, tally=tally)
        per_group: list[dict] = [{} for _ in groups]
        for (gi, i, j), v in zip(keys, verdicts):
            per_group[gi][(i, j)] = v
        return [copeland_scores(len(g), per_group[gi]) for gi, g in enumerate(groups)]

    def _compare(self, items: list[tuple[str, str, str]], chunk: int = 256,
                 tally: JudgeTally | None = None) -> list[str]:
        rs = [self.handle.compare_items.remote(list(items[s:s + chunk])) for s in range(0, len(items), chunk)]
        judgements = [x for part in self._results(rs, chunk, "comparisons") for x in part]
        if tally is not None:
            for j in judgements:
                tally.add_cost(j)
                if len(j.parsed) == 2:  # a pairwise judge, asked both orders inside its app
                    tally.add_orders(*j.parsed, j.preferred)
        return [j.preferred for j in judgements]

    def score(self, items: Sequence[tuple[str, str]], chunk: int = 256, tally: JudgeTally | None = None) -> list[float]:
        """Scores of (prompt, response) items; a costed judge's cost goes into `tally`."""
        # several concurrent calls: @serve.batch and several replicas get to work in parallel
        costed = self.info.costed and tally is not None
        method = self.handle.score_items_costed if costed else self.handle.score_items
        responses = [method.remote(list(items[s:s + chunk])) for s in range(0, len(items), chunk)]
        flat = [x for part in self._results(responses, chunk, "scores") for x in part]
        if not costed:
            return flat
        for _, usage in flat:
            tally.add_usage(usage)
        return [score for score, _ in flat]

    def compare_both_orders(self, items: Sequence[tuple[str, str, str]], chunk: int = 256,
                            tally: JudgeTally | None = None) -> list[str]:
        """'a', 'b', 'tie' or 'invalid' for each (prompt, a, b), asked as (a, b) and as (b, a)."""
        if self.pairwise:  # the LLM judge app asks both orders itself
            return self._compare(list(items), chunk, tally)
        first = self._compare(list(items), chunk, tally)
        swapped = self._compare([(p, b, a) for p, a, b in items], chunk, tally)
        combined = [combine_both_orders(f, s) for f, s in zip(first, swapped)]
        if tally is not None:
            for f, s, c in zip(first, swapped, combined):
                tally.add_orders(f, s, c)
        return combined


@dataclass
class WinRate:
    win_rate: float
    wins: int
    ties: int
    losses: int
    invalid: int
    tally: JudgeTally = field(default_factory=JudgeTally)


def win_rate(judge: JudgeClient, prompts: Sequence[str], policy: Sequence[str],
             baseline: Sequence[Sequence[str]]) -> WinRate:
    """Each policy response against each fixed baseline response of its prompt,
    in both orders; ties count half; invalid verdicts are counted and left out."""
    items = [(p, r, b) for p, r, bs in zip(prompts, policy, baseline) for b in bs]
    tally = JudgeTally()
    verdicts = Counter(judge.compare_both_orders(items, tally=tally))
    valid = verdicts["a"] + verdicts["b"] + verdicts["tie"]
    rate = (verdicts["a"] + 0.5 * verdicts["tie"]) / valid if valid else float("nan")
    return WinRate(rate, verdicts["a"], verdicts["tie"], verdicts["b"], verdicts["invalid"], tally)

