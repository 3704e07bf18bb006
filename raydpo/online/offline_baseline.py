"""The offline baseline on the online loop's schedule (loop.pairs_from=start): every
iteration's pairs are sampled from the starting policy (version 0) before training
begins, then trained on iteration by iteration exactly as online DPO trains on its
fresh pairs. Comparing the two isolates what sampling from the current policy buys."""

from __future__ import annotations

from contextlib import nullcontext

from raydpo.config import RunConfig
from raydpo.online.collect import collect_pairs
from raydpo.online.pairs import PairCounts


def presample(cfg: RunConfig, prompts, pool, judge, store, first: int) -> PairCounts:
    """Pairs of iterations max(first, 2)..N from version 0, into the store (chunks already
    there, from a killed run, are kept). Iteration 1 samples version 0 in the loop itself.
    Returns what was judged now and found stored."""
    total = PairCounts()
    for it in range(max(first, 2), cfg.loop.iterations + 1):
        total.add(collect_pairs(cfg, it, prompts, pool, judge, store, nullcontext, version=0))  # untimed
    return total
