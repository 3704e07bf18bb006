"""Evaluation of each policy version, and the seeds every sample draws from.

Win rate against fixed samples of the starting policy (both orders, ties half), the
judge's mean score, response length, and KL to the reference from the sampler's own
token ids.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from raydpo.config import RunConfig
from raydpo.errors import ConfigError, SamplerError
from raydpo.files import atomic_write
from raydpo.judge.client import win_rate
from raydpo.records import SamplingSettings, derive_seed


# What a batch of samples is for: part of every sample's seed, so the streams never share draws.
TRAIN, BASELINE, EVAL, KL = 1, 2, 3, 4


def sampling(cfg: RunConfig, n: int, temperature: float, **carry: bool):
    """The sampler's settings at `temperature`, `n` per prompt; `carry`: SamplingSettings'
    logprobs and text flags."""
    return replace(SamplingSettings.from_config(cfg.sampler), n=n, temperature=temperature, seed=None, **carry)


def prompt_seeds(cfg: RunConfig, purpose: int, it: int, positions) -> list[int]:
    """One seed per prompt from (run seed, purpose, iteration, the prompt's position in its
    window); sample j of a prompt draws with derive_seed(that, j). So every sample's draws are
    fixed by what it is, whichever engine, chunk or resumed run produces it."""
    run_seed = cfg.seed if cfg.sampler.seed is None else cfg.sampler.seed
    return [derive_seed(run_seed, purpose, it, p) for p in positions]


def baseline_samples(cfg: RunConfig, run_dir: Path, pool, prompts: list[str]) -> list[list[str]]:
    """`eval_baseline_samples` fixed responses of the starting policy per eval prompt,
    drawn once (policy_version 0) and kept in <run_dir>/eval/baseline.jsonl."""
    path = run_dir / "eval" / "baseline.jsonl"
    k = cfg.loop.eval_baseline_samples
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if [r["prompt"] for r in rows] == prompts and all(len(r["responses"]) == k for r in rows):
            return [r["responses"] for r in rows]
        raise ConfigError(f"{path} was drawn for other eval prompts or eval_baseline_samples; "
                          f"use another run_dir")
    if pool.version != 0:
        raise SamplerError("baseline samples must come from the starting policy (version 0)")
    samples = pool.sample(prompts, sampling(cfg, k, cfg.loop.eval_temperature, logprobs=False),
                          seeds=prompt_seeds(cfg, BASELINE, 0, range(len(prompts))))
    groups = [[s.text for s in samples[i * k:(i + 1) * k]] for i in range(len(prompts))]
    atomic_write(path, (json.dumps({"prompt": p, "responses": g}) + "\n" for p, g in zip(prompts, groups)))
    return groups


def evaluate(cfg: RunConfig, it: int, pool, judge, trainer, prompts: list[str],
             baseline: list[list[str]], sampler_logps: bool = False) -> dict:
    """Win rate of the current policy against the starting policy's fixed samples
    (both orders, ties half), mean judge score and length, and KL to the reference."""
    return score_eval(cfg, it, judge, trainer, prompts, baseline, *draw_eval(cfg, it, pool, prompts),
                      sampler_logps=sampler_logps)


def draw_eval(cfg: RunConfig, it: int, pool, prompts: list[str]) -> tuple[list, list]:
    """The samplers' part of evaluating version `it`: a response per prompt at the eval
    temperature, and (for KL) one at temperature 1. Every sample must come from version `it`.

    One chunk per engine, not the pool's default two: an engine runs one call at a time, and
    vLLM on CPU drew the evaluation's 512 samples 12% faster in 256-request calls than in
    128-request ones (2 cores). What it gives up, with several engines: an engine that is
    slow (busy with the producer's chunk in the overlapped loop) or dies keeps or loses its
    whole share, where a free engine used to take the second half."""
    size = -(-len(prompts) // len(pool.actors))
    # what each use reads, and no more: the win rate reads text, the KL estimate ids and log-probs
    # (vLLM drew 256 evaluation samples 18% faster without log-probs, 2 cores)
    samples = pool.sample(prompts, sampling(cfg, 1, cfg.loop.eval_temperature, logprobs=False), min_version=it,
                          chunk_size=size, seeds=prompt_seeds(cfg, EVAL, it, range(len(prompts))))
    hot = []
    if cfg.loop.eval_kl and it > 0:
        hot = pool.sample(prompts, sampling(cfg, 1, 1.0, text=False), min_version=it, chunk_size=size,
                          seeds=prompt_seeds(cfg, KL, it, range(len(prompts))))
    versions = {s.policy_version for s in samples + hot}
    if versions != {it}:
        raise SamplerError(f"evaluating version {it}: samples from versions {sorted(versions)}")
    return samples, hot


def score_eval(cfg: RunConfig, it: int, judge, trainer, prompts: list[str], baseline: list[list[str]],
               samples: list, hot: list, sampler_logps: bool = False) -> dict:
    """The judge's and the trainer's part: win rate, judge score, length, KL. `sampler_logps`:
    take log pi(y|x) from the sampler (the version that drew y) and only the reference from the
    trainer, which may hold a newer version by now."""
    wr = win_rate(judge, prompts, [s.text for s in samples], baseline)
    scores = [] if judge.pairwise else judge.score([(s.prompt, s.text) for s in samples], tally=wr.tally)
    out = {"win_rate": wr.win_rate, "wins": wr.wins, "ties": wr.ties, "losses": wr.losses, "invalid": wr.invalid,
           **wr.tally.row("eval_judge_"),
           "judge_score": statistics.mean(scores) if scores else float("nan"),
           "response_tokens": statistics.mean(len(s.token_ids) for s in samples)}
    if hot:
        # the sampler's own ids: the trainer scores exactly the context and tokens that were sampled
        # beside training, the request queues behind up to a train command: wait as long as one may take
        out["kl"] = trainer.kl([list(s.prompt_token_ids) for s in hot], [list(s.token_ids) for s in hot],
                               policy_logps=[float(sum(s.logprobs)) for s in hot] if sampler_logps else None,
                               timeout_s=4200 if sampler_logps else 600).kl
    elif it == 0:
        out["kl"] = 0.0
    return out
