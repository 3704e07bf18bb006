"""Steps 1-5 of an iteration: prompts -> samples -> judge -> pairs -> store, chunk by chunk."""

from __future__ import annotations

from dataclasses import asdict

from raydpo.config import RunConfig
from raydpo.errors import SamplerError
from raydpo.judge.client import JudgeTally
from raydpo.online.evaluate import TRAIN, prompt_seeds, sampling
from raydpo.online.pairs import PairCounts, build_pairs
from raydpo.online.resume import stored_counts


def collect_pairs(cfg: RunConfig, it: int, prompts, pool, judge, store, timer, version: int,
                  oldest: int | None = None, check=None) -> PairCounts:
    """Steps 1-5 for iteration `it`, sampling from policy `version`, or with `oldest` from any
    version in [oldest, version] (the loop with loop.max_staleness: the samplers pick up newer
    weights between chunks, and each chunk's samples carry the version that produced them).
    Returns the PairCounts of the chunks done now plus those found already stored (a resumed
    iteration, or one pre-sampled by the offline baseline). `check`: called before each chunk
    is judged, to stop between chunks by raising (the overlapped loop shutting down)."""
    oldest = version if oldest is None else oldest
    n, k, size = cfg.loop.prompts_per_iteration, cfg.sampler.samples_per_prompt, cfg.loop.chunk_prompts
    with timer("sample"):
        window = prompts.window(it, n)
    chunks = [(ci, window[s:s + size]) for ci, s in enumerate(range(0, len(window), size))]
    todo = [(ci, ps) for ci, ps in chunks if not store.has_chunk(it, ci)]
    counts = stored_counts(store, it, [ci for ci, _ in chunks])
    if not todo:
        return counts
    flat = [p for _, ps in todo for p in ps]
    starts = [sum(len(ps) for _, ps in todo[:j]) for j in range(len(todo))]
    seeds = prompt_seeds(cfg, TRAIN, it, [ci * size + j for ci, ps in todo for j in range(len(ps))])
    if not oldest <= pool.version <= version:
        wanted = version if oldest == version else f"{oldest}..{version}"
        raise SamplerError(f"iteration {it} wants samples of policy version {wanted}; the pool is at {pool.version}")
    stream = pool.stream(flat, sampling(cfg, k, cfg.sampler.temperature), min_version=oldest, chunk_size=size,
                         seeds=seeds)
    while True:
        with timer("sample"):
            chunk = next(stream, None)  # the pool keeps sampling the next chunk meanwhile
        if chunk is None:
            break
        if check is not None:
            check()
        j = starts.index(min(s.prompt_index for s in chunk))
        ci = todo[j][0]
        chunk.sort(key=lambda s: (s.prompt_index, s.sample_index))
        groups = [chunk[g * k:(g + 1) * k] for g in range(len(chunk) // k)]
        if any(not oldest <= s.policy_version <= version for s in chunk):
            raise SamplerError(f"iteration {it}: samples from policy versions "
                               f"{sorted({s.policy_version for s in chunk})}, expected {oldest}..{version}")
        tally = JudgeTally()
        with timer("judge"):
            ranked = judge.rank([[(s.prompt, s.text) for s in g] for g in groups], tally=tally)
        pairs, c = build_pairs(groups, ranked, iteration=it,
                               first_prompt=ci * size, judge=judge.name, mode=cfg.loop.pairs,
                               tie_margin=cfg.judge.tie_margin, pair_margin=cfg.loop.pair_margin)
        c.invalid, c.judge = tally.invalid, asdict(tally)
        with timer("store"):
            store.write_chunk(it, ci, pairs, counts=asdict(c))  # durable before anything else happens to them
        counts.add(c)
    return counts

