"""`raydpo judge eval`: how often a judge agrees with labelled preference pairs.

Each labelled pair (any preference format `raydpo data validate` reads; chat pairs are
skipped and counted, as the held-out scorers do) is asked as (chosen, rejected) and as
(rejected, chosen), through the same Serve deployment and JudgeClient the loop uses.
Agreeing with the label in both orders is correct, the reverse wrong, a disagreement
between the orders (or a scoring judge's tie) a tie, counted half; an unparseable answer
is invalid and left out. The interval is Wilson's 95% score interval over the valid pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raydpo.judge.client import JudgeTally

Z95 = 1.959963984540054


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion p observed over n trials."""
    if n == 0:
        return math.nan, math.nan
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class JudgeEval:
    judge: str
    pairs: int
    skipped: int
    correct: int
    wrong: int
    ties: int
    invalid: int
    tally: JudgeTally

    @property
    def valid(self) -> int:
        return self.correct + self.wrong + self.ties

    @property
    def accuracy(self) -> float:
        return (self.correct + 0.5 * self.ties) / self.valid if self.valid else math.nan

    def table(self) -> str:
        lo, hi = wilson(self.accuracy, self.valid)
        t = self.tally
        rows = [("judge", self.judge), ("labelled pairs judged", str(self.pairs)),
                ("skipped records", str(self.skipped)),
                ("correct / wrong / ties / invalid", f"{self.correct} / {self.wrong} / {self.ties} / {self.invalid}"),
                ("accuracy (ties half)", f"{self.accuracy:.3f}  [95% CI {lo:.3f}, {hi:.3f}]"),
                ("position consistency", f"{t.consistent / t.compared:.3f}" if t.compared else "-"),
                ("tie rate / invalid rate", f"{t.ties / t.compared:.3f} / {t.invalid / t.compared:.3f}"
                 if t.compared else "-")]
        if t.calls or t.cached:
            rows.append(("calls / from the cache / retries", f"{t.calls} / {t.cached} / {t.retries}"))
            rows.append(("tokens (prompt + completion)", f"{t.prompt_tokens} + {t.completion_tokens}"))
            rows.append(("cost", f"{t.cost:.4f}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def judge_labelled(judge, pairs: list[dict], skipped: int = 0) -> JudgeEval:
    """`judge`: a JudgeClient; `pairs`: {prompt, chosen, rejected} text."""
    tally = JudgeTally()
    verdicts = judge.compare_both_orders([(p["prompt"], p["chosen"], p["rejected"]) for p in pairs], tally=tally)
    return JudgeEval(judge.name, len(pairs), skipped, verdicts.count("a"), verdicts.count("b"), verdicts.count("tie"),
                     verdicts.count("invalid"), tally)


def run(cfg, path: str, fmt: str = "auto", limit: int = 0) -> JudgeEval:
    """Deploy cfg.judge on Ray Serve (a local Ray unless cluster.address / RAY_ADDRESS) and judge `path`."""
    from raydpo.cluster import init_ray
    from raydpo.data.formats import text_pairs
    from raydpo.errors import DataError
    from raydpo.judge import kinds
    from raydpo.judge.client import JudgeClient

    pairs, skipped = text_pairs(path, fmt)
    if limit:
        pairs = pairs[:limit]
    if not pairs:
        raise DataError(f"{path}: no usable text preference pairs ({skipped} records skipped)")
    init_ray(cfg, roles=("judge",))
    # its own app name: on a shared cluster, a running loop's "judge" app stays as it is
    judge = JudgeClient(kinds.deploy(cfg, name="judge_eval"), timeout_s=cfg.judge.call_timeout_s)
    return judge_labelled(judge, pairs, skipped)
