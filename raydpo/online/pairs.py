"""Judged samples -> preference pairs, and what was dropped on the way (pure: no Ray)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from raydpo.data.store import StoredPair
from raydpo.judge.rules import TIE_EPS
from raydpo.records import Sample


@dataclass
class PairCounts:
    prompts: int = 0
    samples: int = 0
    pairs: int = 0
    ties: int = 0  # prompts (best_worst) or candidate pairs (all) dropped: score gap within the tie margin
    identical: int = 0  # dropped: chosen and rejected texts are the same
    below_margin: int = 0  # pairs='all': gap above the tie margin but not above pair_margin
    invalid: int = 0  # pairwise judges: comparisons answered unparseably (left out of the ranking)
    unranked: int = 0  # samples left out of pairing: every comparison of theirs was unparseable
    judge: dict = field(default_factory=dict)  # raydpo.judge.client.JudgeTally of ranking these prompts, as a dict

    def add(self, other: PairCounts) -> None:
        for k, v in other.__dict__.items():
            if k == "judge":
                self.judge = {n: self.judge.get(n, 0) + v.get(n, 0) for n in {**self.judge, **v}}
            else:
                setattr(self, k, getattr(self, k) + v)


def build_pairs(groups: Sequence[Sequence[Sample]], scores: Sequence[Sequence[float]], *, iteration: int,
                first_prompt: int, judge: str, mode: str = "best_worst", tie_margin: float = 0.0,
                pair_margin: float = 0.0) -> tuple[list[StoredPair], PairCounts]:
    """Preference pairs from the k judged samples of each prompt.

    ``best_worst``: the highest- vs the lowest-scored sample, if their gap is
    above `tie_margin` and their texts differ. ``all``: every pair of distinct
    texts whose gap is above max(tie_margin, pair_margin). Pair ids are
    deterministic (iteration, prompt position, sample indices), so re-running
    the same chunk gives the same ids.
    """
    out, c = [], PairCounts()
    for g, (samples, sc) in enumerate(zip(groups, scores)):
        c.prompts += 1
        c.samples += len(samples)
        versions = {s.policy_version for s in samples}
        if len(versions) != 1:
            raise ValueError(f"prompt {first_prompt + g}: samples from several policy versions {sorted(versions)}")
        version = versions.pop()
        ranked = [i for i in range(len(samples)) if not math.isnan(sc[i])]  # NaN: the judge could not rank it
        c.unranked += len(samples) - len(ranked)
        order = sorted(ranked, key=lambda i: (sc[i], -i))  # worst .. best; ties: lower index wins
        if mode == "best_worst":
            candidates = [(order[-1], order[0])] if len(order) > 1 else []
        else:
            candidates = [(i, j) for i in ranked for j in ranked if sc[i] > sc[j]]
        for ci, ri in candidates:
            gap = sc[ci] - sc[ri]
            if gap <= tie_margin + TIE_EPS:
                c.ties += 1
            elif samples[ci].text == samples[ri].text:
                c.identical += 1
            elif mode == "all" and gap <= pair_margin + TIE_EPS:
                c.below_margin += 1
            else:
                out.append(StoredPair(
                    pair_id=f"it{iteration:06d}-p{first_prompt + g:06d}-s{ci}-{ri}", iteration=iteration,
                    policy_version=version, source="online", prompt=samples[ci].prompt, chosen=samples[ci].text,
                    rejected=samples[ri].text, chosen_score=float(sc[ci]), rejected_score=float(sc[ri]), judge=judge,
                    prompt_token_ids=samples[ci].prompt_token_ids, chosen_token_ids=samples[ci].token_ids,
                    rejected_token_ids=samples[ri].token_ids, chosen_finish_reason=samples[ci].finish_reason,
                    rejected_finish_reason=samples[ri].finish_reason, chosen_logprobs=samples[ci].logprobs,
                    rejected_logprobs=samples[ri].logprobs))
    c.pairs = len(out)
    return out, c


def counts_row(counts) -> dict:
    """A metrics row's judging columns from PairCounts, and what ranking showed of the judge
    (`judge_*`: raydpo.judge.client.JudgeTally.row)."""
    from raydpo.judge.client import JudgeTally

    return {"pairs": counts.pairs, "ties_dropped": counts.ties, "identical_dropped": counts.identical,
            "below_margin_dropped": counts.below_margin, "invalid_comparisons": counts.invalid,
            "unranked_samples": counts.unranked, "prompts": counts.prompts, "samples": counts.samples,
            **JudgeTally(**counts.judge).row("judge_")}

