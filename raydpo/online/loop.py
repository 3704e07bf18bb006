"""Online DPO, top-down. Entry points: `jobs/online_dpo.py` and `raydpo online`.

    set-up:   task prompts, base model, SFT stage, then the long-lived roles:
              judge (Ray Serve), sampler pool (vLLM actors), trainer (one Ray Train run),
              policy endpoint (Ray Serve); resume state (`raydpo.online.resume`)
    iteration i = 1..N:
      1. prompts    the next window of prompts
      2. sample     k responses per prompt from policy version i-1 (vLLM pool)
      3. judge      score every response, or compare them pairwise (Serve deployment handle)
      4. pairs      best vs worst (or all above a margin); ties and identical texts counted and dropped
      5. store      each judged chunk -> Parquet preference store, atomically, at once
      6. train      Ray Data reads the fresh pairs (+ replay) -> DPO passes on the trainer
      7. publish    new weights -> every sampler (policy_version i) and the policy endpoint
      8. evaluate   win rate vs the starting policy (both orders), judge score, length, KL
    report:   metrics JSONL, markdown + PNG under <run_dir>/report

Iteration 0 evaluates the starting policy against its own fixed samples: the noise floor.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from raydpo import console
from raydpo.config import RunConfig
from raydpo.online import offline_baseline
from raydpo.online.collect import collect_pairs
from raydpo.online.evaluate import baseline_samples, evaluate
from raydpo.online.pairs import counts_row
from raydpo.online.resume import (ResumePoint, catch_up, check_run_dir, iteration_checkpoint, publish_trained,
                                  resume_point, trained_row)
from raydpo.online.training_data import dpo_metrics, pairs_version, training_data, warm_up_ray_data
from raydpo.report import TIME_KEYS, append_metrics, judge_total, read_metrics, table, write_report


def log(msg: str) -> None:
    console.log("online", msg)


class Timer:
    """Seconds spent per phase of one iteration; whatever is not in a phase is 'other'."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.spent = {k: 0.0 for k in TIME_KEYS if k != "other"}

    @contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.spent[phase] += time.perf_counter() - t

    def row(self) -> dict[str, float]:
        total = time.perf_counter() - self.t0
        return {**{f"time_{k}": v for k, v in self.spent.items()},
                "time_other": max(0.0, total - sum(self.spent.values())), "time_total": total}


@dataclass
class Run:
    """A run's long-lived roles and what every iteration reads."""

    judge: object  # raydpo.judge.client.JudgeClient
    pool: object  # raydpo.sampler.pool.SamplerPool
    trainer: object  # raydpo.train.online_client.TrainerClient
    policy: object | None  # raydpo.policy.endpoint.PolicyEndpoint, if loop.serve_policy
    store: object  # raydpo.data.store.PreferenceStore
    prompts: object  # raydpo.online.prompts.PromptSource
    eval_prompts: list[str]
    baseline: list[list[str]]  # fixed samples of the starting policy per eval prompt
    first_row: dict  # iteration 0's extra columns
    warm: object = None  # the thread warming Ray Data up (`training_data.warm_up_ray_data`)


def run(cfg: RunConfig, resume: bool = False) -> int:
    run_dir = Path(cfg.run_dir).resolve()
    check_run_dir(cfg, resume)
    t_start = time.time()
    r, point = start(cfg, run_dir, resume, t_start)
    try:
        prepare(cfg, run_dir, r, point)
        if cfg.loop.max_staleness:  # sampling ahead, evaluation beside training
            from raydpo.online.overlapped import run_iterations

            run_iterations(cfg, r, point, run_dir, log_iteration)
        else:
            for it in range(point.first, cfg.loop.iterations + 1):
                row = iteration(cfg, it, r, point, run_dir)
                append_metrics(run_dir, row)
                log_iteration(row)
        if r.policy:
            r.policy.settle()  # the endpoint serves the last version before the run ends
    finally:
        stop(r)
    finish(run_dir, r, t_start)
    return 0


def iteration(cfg: RunConfig, it: int, r: Run, point: ResumePoint, run_dir: Path) -> dict:
    """One iteration of online DPO: its metrics row."""
    timer = Timer()
    row: dict = {"iteration": it, "policy_version": it}
    if it == 0:
        row.update(pairs=0, **r.first_row)
    elif it > point.trained_upto:
        # 1-5: prompts -> samples -> judge -> pairs -> store (chunk by chunk)
        version = pairs_version(cfg, it)
        row.update(counts_row(collect_pairs(cfg, it, r.prompts, r.pool, r.judge, r.store, timer, version)))
        # 6-7: train on the fresh pairs (+ replay), publish the new weights
        row.update(train_and_publish(cfg, it, r, timer, run_dir))
    else:  # trained before the driver died, not evaluated
        publish_trained(it, run_dir, r.pool, r.policy)
        row.update(trained_row(cfg, r.store, run_dir, it))
    # 8: evaluate against the starting policy
    with timer("eval"):
        # after an overlapped run resumed with k=0 the trainer may hold a later version than `it`:
        # then log pi comes from the sampler, as in the overlapped loop
        row.update(evaluate(cfg, it, r.pool, r.judge, r.trainer, r.eval_prompts, r.baseline,
                            sampler_logps=it < point.trained_upto))
    return {**row, **timer.row()}


def train_and_publish(cfg: RunConfig, it: int, r: Run, timer: Timer, run_dir: Path) -> dict:
    """Steps 6-7: DPO passes over the iteration's pairs on the trainer, then the new weights
    to every sampler and the policy endpoint. Returns the row's training columns."""
    row, result = train(cfg, it, r, timer)
    with timer("sync"):
        publish(cfg, it, r, result, run_dir)
    return row


def train(cfg: RunConfig, it: int, r: Run, timer: Timer) -> tuple[dict, object]:
    """Step 6: the row's training columns, and the trainer's `TrainResult` (its new weights)."""
    with timer("train"):
        t = time.perf_counter()
        ds, kept = training_data(cfg, r.store, it)
        t_data = time.perf_counter() - t
        nccl = cfg.sampler.weight_transport == "nccl"  # GPU only, never run here
        result = r.trainer.train(it, ds, cfg.loop.dpo_passes, refresh_reference=cfg.loop.reference_policy == "previous",
                                 engines=tuple(r.pool.actors) if nccl else (), kept=kept)
    return {**kept, "train_steps": result.steps, "trained_pairs": result.pairs, **dpo_metrics(result.metrics),
            "time_train_data": t_data, **{f"time_train_{k}": v for k, v in result.timing.items()}}, result


def publish(cfg: RunConfig, it: int, r: Run, result, run_dir: Path) -> None:
    """Step 7: version `it` (the weights in `result`) to every sampler and the policy endpoint."""
    path, stored = str(iteration_checkpoint(run_dir, it)), result.weights[0]
    if cfg.sampler.weight_transport == "nccl":  # the engines hold the new weights already, unless this reply
        r.pool.publish(it, path=path, sent=stored is None and not result.from_checkpoint)  # came from a checkpoint
    else:
        r.pool.publish(it, state_dict=stored)
    if r.policy:
        r.policy.publish(it, weights=stored, path=path, wait=False)  # loaded while the loop goes on


def log_iteration(row: dict) -> None:
    wait = f"waited for pairs {row['time_wait']:.1f}, " if row.get("time_wait") else ""
    stale = row.get("staleness_hist")
    if stale and len(stale) > 1:
        wait += f"staleness {'/'.join(map(str, stale))}, dropped {row.get('stale_dropped', 0)}; "
    log(f"iteration {row['iteration']}: pairs {row.get('pairs', 0)}, win vs start {row['win_rate']:.3f}, "
        f"judge score {row['judge_score']:.3f}, KL {row.get('kl', float('nan')):.2f} "
        f"({row['time_total']:.1f}s: sample {row['time_sample']:.1f}, judge {row['time_judge']:.1f}, "
        f"{wait}train {row['time_train']:.1f}, sync {row['time_sync']:.2f}, eval {row['time_eval']:.1f}, "
        f"other {row['time_other']:.1f})")
    calls, hits = judge_total(row, "calls"), judge_total(row, "cache_hits")
    if calls or hits:  # a remote judge: what it cost
        log(f"  judge: {calls:.0f} calls (+{judge_total(row, 'retries'):.0f} retries), {hits:.0f} answers from the "
            f"cache, cost {judge_total(row, 'cost'):.4f}")


# ------------------------------------------------------------------ set-up and tear-down


def start(cfg: RunConfig, run_dir: Path, resume: bool, t_start: float) -> tuple[Run, ResumePoint]:
    """The task, the starting policy (SFT), the long-lived roles, and where to (re)start."""
    from transformers import AutoTokenizer

    from raydpo.cluster import init_ray
    from raydpo.job import base_model
    from raydpo.online.prompts import PromptSource, task_prompts, warn_overlap
    from raydpo.train.staged import sft_stage

    base = base_model(cfg, sampled=True)
    train_prompts, eval_prompts_path = task_prompts(cfg, run_dir)
    # the long-lived roles, and a CPU for the Ray Data tasks that read the store while they are up
    init_ray(cfg, roles=("trainer", "sampler", "judge") + (("policy",) if cfg.loop.serve_policy else ()), data_cpus=1)
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    log(f"task and base model ready ({time.time() - t_start:.0f}s)")
    start_path = base if cfg.trainer.sft_steps == 0 else sft_stage(cfg, base, run_dir, tokenizer.pad_token_id)
    log(f"starting policy: {start_path} ({time.time() - t_start:.0f}s)")
    prompts = PromptSource(train_prompts, cfg.seed)
    eval_prompts = PromptSource(eval_prompts_path, cfg.seed).all()[: cfg.loop.eval_prompts]
    for bad in prompts.report.examples[:5]:
        log(f"skipped prompt record: {bad}")
    first_row = {"eval_train_overlap": warn_overlap(eval_prompts, prompts.all()), "skipped_prompt_records": prompts.bad}
    point = resume_point(run_dir, resume)
    warm = warm_up_ray_data()
    r = start_roles(cfg, run_dir, str(start_path), tokenizer.pad_token_id, point, t_start)
    r.prompts, r.eval_prompts, r.first_row, r.warm = prompts, eval_prompts, first_row, warm
    log(f"judge '{r.judge.name}' on Serve; {prompts.size} training prompts ({prompts.bad} unusable skipped), "
        f"{len(eval_prompts)} eval prompts")
    return r, point


def prepare(cfg: RunConfig, run_dir: Path, r: Run, point: ResumePoint) -> None:
    """With the roles up: the starting policy's fixed eval samples, the offline baseline's
    pairs (loop.pairs_from=start), and on resume the weights the next iteration needs."""
    r.baseline = baseline_samples(cfg, run_dir, r.pool, r.eval_prompts)  # drawn from version 0, before any publish
    if cfg.loop.pairs_from == "start" and point.trained_upto == 0:
        c = offline_baseline.presample(cfg, r.prompts, r.pool, r.judge, r.store, point.first)
        log(f"offline baseline: {c.pairs} pairs from the starting policy for iterations 2..{cfg.loop.iterations}")
    catch_up(point, run_dir, r.pool, r.policy)
    r.warm.join()
    if point.first > 0:
        log(f"resuming at iteration {point.first} (trained through {point.trained_upto}; "
            f"{r.store.count()} pairs stored)")


def start_roles(cfg: RunConfig, run_dir: Path, start_path: str, pad_id: int, point: ResumePoint,
                t_start: float) -> Run:
    from raydpo.data.store import PreferenceStore
    from raydpo.judge import kinds
    from raydpo.judge.client import JudgeClient
    from raydpo.sampler.pool import SamplerPool
    from raydpo.train.online_client import TrainerClient

    judge = JudgeClient(kinds.deploy(cfg), timeout_s=cfg.judge.call_timeout_s)
    trainer = TrainerClient(cfg, start_path, str(run_dir), pad_id,
                            resume_from=str(point.checkpoint) if point.checkpoint else None)
    pool = SamplerPool.from_config(cfg, start_path)
    log(f"{len(pool.actors)} sampler engine(s) and {cfg.cluster.trainer.count} trainer worker(s) up "
        f"({time.time() - t_start:.0f}s)")
    policy = None
    if cfg.loop.serve_policy:
        from raydpo.policy.endpoint import PolicyEndpoint

        policy = PolicyEndpoint(cfg, start_path)
        log(f"policy endpoint: {policy.url} (OpenAI-compatible, model 'policy'; "
            f"system_fingerprint names the version) ({time.time() - t_start:.0f}s)")
    store = PreferenceStore(run_dir / "preferences")
    if store.clean_staging():
        log("removed unfinished store writes of a killed run (their pairs were never committed)")
    return Run(judge, pool, trainer, policy, store, None, [], [], {})


def stop(r: Run) -> None:
    """Stop the trainer and the samplers; a trainer failure is raised after both are down."""
    from raydpo.errors import TrainerError

    trainer_error = None
    try:
        r.trainer.close()
    except TrainerError as e:
        trainer_error = e
    r.pool.shutdown()
    if trainer_error:
        raise trainer_error


def finish(run_dir: Path, r: Run, t_start: float) -> None:
    rows = read_metrics(run_dir)
    md = write_report(run_dir, {"wall time": f"{time.time() - t_start:.0f}s",
                                "sampler restarts": str(r.pool.stats.restarts),
                                "nodes holding the last weights": str(r.pool.stats.weights_nodes)})
    print("\n" + table(rows))
    print(f"\nfinal win rate vs the starting policy: {rows[-1]['win_rate']:.3f} "
          f"(iteration 0, the noise floor: {rows[0]['win_rate']:.3f})")
    print(f"store: {r.store.root} ({r.store.count()} pairs) | metrics: {run_dir / 'online_metrics.jsonl'} | "
          f"report: {md}")
    print(f"run_dir: {run_dir}")


def main(argv: list[str] | None = None, prog: str = "online_dpo") -> int:
    from raydpo.job import run_job

    return run_job(lambda cfg, args: run(cfg, resume=args.resume), __doc__, argv, prog=prog, resume=True,
                   before_save=lambda cfg, args: check_run_dir(cfg, args.resume))
