"""The online-DPO loop, top-down. Entry points: `jobs/online_dpo.py` and `raydpo online`.

    set-up:   task prompts, base model, SFT stage, then the long-lived roles:
              judge (Ray Serve), sampler pool (vLLM actors), trainer (one Ray Train run)
    iteration i = 1..N:
      1. prompts    the next window of prompts (Ray Data)
      2. sample     k responses per prompt from policy version i-1 (vLLM pool)
      3. judge      score every response (Serve deployment handle)
      4. pairs      best vs worst (or all above a margin); ties and identical texts counted and dropped
      5. store      each judged chunk -> Parquet preference store, atomically, at once
      6. train      Ray Data reads + tokenizes the fresh pairs (+ replay) -> DPO passes on the trainer
      7. publish    new weights -> every sampler (policy_version i) and the policy endpoint
      8. evaluate   win rate vs the starting policy (both orders), judge score, length, KL
    report:   metrics JSONL, markdown + PNG under <run_dir>/report

Resume (`--resume`): iterations with a metrics row are done; an iteration whose
checkpoint exists but was not evaluated is published and evaluated; otherwise
its stored chunks are kept and only the missing chunks are sampled and judged,
so every judged pair is in the store exactly once.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from raydpo.config import ConfigError, RunConfig, require
from raydpo.report import METRICS_FILE, TIME_KEYS, read_metrics, table, write_report


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


def log(msg: str) -> None:
    print(f"[online] {msg}", flush=True)


def run(cfg: RunConfig, resume: bool = False) -> int:
    from raydpo.runner import base_model, init_ray

    run_dir = Path(cfg.run_dir).resolve()
    check_run_dir(cfg, resume)
    t_start = time.time()

    # ---------------------------------------------------------------- set-up
    base = base_model(cfg)
    train_prompts, eval_prompts_path = task_prompts(cfg, run_dir)
    c = cfg.cluster
    # the long-lived roles, and a CPU for the Ray Data tasks that read the store while they are up
    init_ray(cfg, roles=("trainer", "sampler", "judge") + (("policy",) if cfg.loop.serve_policy else ()), data_cpus=1)
    from transformers import AutoTokenizer

    from raydpo.data.store import PreferenceStore
    from raydpo.online import JudgeClient, OnlineTrainer, PromptSource, latest_iteration_checkpoint
    from raydpo.sampler import SamplerPool

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    log(f"task and base model ready ({time.time() - t_start:.0f}s)")
    start = sft_stage(cfg, base, run_dir, tokenizer.pad_token_id)
    log(f"starting policy: {start} ({time.time() - t_start:.0f}s)")

    judge = JudgeClient(deploy_judge(cfg))
    prompts = PromptSource(train_prompts, cfg.seed)
    eval_prompts = PromptSource(eval_prompts_path, cfg.seed).all()[: cfg.loop.eval_prompts]
    log(f"judge '{judge.name}' on Serve; {prompts.size} training prompts ({prompts.bad} unusable skipped), "
        f"{len(eval_prompts)} eval prompts")
    for bad in prompts.report.examples[:5]:
        log(f"skipped prompt record: {bad}")
    overlap = warn_overlap(eval_prompts, prompts.all())
    found = latest_iteration_checkpoint(run_dir / "ray_train", "online") if resume else None
    trained_upto = found[1]["iteration"] if found else 0
    prune_step_metrics(run_dir, trained_upto)  # steps of a killed iteration are trained (and logged) again
    trainer = OnlineTrainer(cfg, str(start), str(run_dir), tokenizer.pad_token_id,
                            resume_from=str(found[0]) if found else None)
    pool = SamplerPool.from_config(cfg, str(start))
    log(f"{len(pool.actors)} sampler engine(s) and {c.trainer.count} trainer worker(s) up "
        f"({time.time() - t_start:.0f}s)")
    policy = None
    if cfg.loop.serve_policy:
        from raydpo.serve_policy import PolicyEndpoint

        policy = PolicyEndpoint(cfg, str(start))
        log(f"policy endpoint: {policy.url} (OpenAI-compatible, model 'policy'; "
            f"system_fingerprint names the version) ({time.time() - t_start:.0f}s)")
    store = PreferenceStore(run_dir / "preferences")
    if store.clean_staging():
        log("removed unfinished store writes of a killed run (their pairs were never committed)")

    baseline = baseline_samples(cfg, run_dir, pool, eval_prompts)  # fixed samples of the starting policy
    done = read_metrics(run_dir)
    if done:  # rewrite without a line a killed driver may have cut off, so appends start on a fresh line
        tmp = run_dir / (METRICS_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in done))
        tmp.replace(run_dir / METRICS_FILE)
    first = done[-1]["iteration"] + 1 if done else 0
    if found and trained_upto >= first:
        pool.publish(trained_upto, path=str(found[0]))  # the newest trained weights, to evaluate them
    if first > 0:
        log(f"resuming at iteration {first} (trained through {trained_upto}; {store.count()} pairs stored)")
        if pool.version < first - 1:
            ckpt = Path(run_dir / "ray_train" / "online" / f"iter-{first - 1:06d}")
            pool.publish(first - 1, path=str(ckpt))
    if policy and pool.version > 0:
        policy.publish(pool.version, path=str(run_dir / "ray_train" / "online" / f"iter-{pool.version:06d}"))

    try:
        for it in range(first, cfg.loop.iterations + 1):
            timer = Timer()
            row: dict = {"iteration": it, "policy_version": it}
            if it == 0:
                # the starting policy against its own fixed samples: the noise floor
                row.update(pairs=0, eval_train_overlap=overlap, skipped_prompt_records=prompts.bad)
            elif it > trained_upto:
                if cfg.loop.pairs_from == "start" and it == 1:  # offline baseline: every pair from version 0, now
                    for later in range(2, cfg.loop.iterations + 1):
                        collect_pairs(cfg, later, prompts, pool, judge, store, Timer(), version=0)
                # 1-5: prompts -> samples -> judge -> pairs -> store (chunk by chunk)
                version = it - 1 if cfg.loop.pairs_from == "current" else 0
                row.update(counts_row(collect_pairs(cfg, it, prompts, pool, judge, store, timer, version=version)))
                # 6: train on the fresh pairs (+ replay), streamed by Ray Data
                with timer("train"):
                    t = time.perf_counter()
                    ds, kept = training_data(cfg, store, it)
                    row.update(kept)
                    t_data = time.perf_counter() - t
                    reply = trainer.train(it, ds, cfg.loop.dpo_passes, refresh_reference=cfg.loop.reference == "previous")
                row.update(train_steps=reply["steps"], trained_pairs=reply["pairs"], **dpo_metrics(reply["metrics"]),
                           time_train_data=t_data, **{f"time_train_{k}": v for k, v in reply["timing"].items()})
                # 7: publish the new weights to every sampler
                with timer("sync"):
                    pool.publish(it, state_dict=reply["weights"][0])
                    if policy:
                        policy.publish(it, state_ref=reply["weights"][0],
                                       path=str(run_dir / "ray_train" / "online" / f"iter-{it:06d}"))
            else:  # trained before the driver died, not evaluated: pairs and weights are published above
                row.update(trained_row(cfg, store, run_dir, it))
            # 8: evaluate against the starting policy
            with timer("eval"):
                row.update(evaluate(cfg, it, pool, judge, trainer, eval_prompts, baseline))
            row.update(timer.row())
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"iteration {it}: pairs {row.get('pairs', 0)}, win vs start {row['win_rate']:.3f}, "
                f"judge score {row['judge_score']:.3f}, KL {row.get('kl', float('nan')):.2f} "
                f"({row['time_total']:.1f}s: sample {row['time_sample']:.1f}, judge {row['time_judge']:.1f}, "
                f"train {row['time_train']:.1f}, sync {row['time_sync']:.2f}, eval {row['time_eval']:.1f}, "
                f"other {row['time_other']:.1f})")
    finally:
        trainer_error = None
        try:
            trainer.close()
        except RuntimeError as e:
            trainer_error = e
        pool.shutdown()
    if trainer_error:
        raise trainer_error

    rows = read_metrics(run_dir)
    md = write_report(run_dir, {"wall time": f"{time.time() - t_start:.0f}s",
                                "sampler restarts": str(pool.stats.restarts)})
    print("\n" + table(rows))
    print(f"\nfinal win rate vs the starting policy: {rows[-1]['win_rate']:.3f} "
          f"(iteration 0, the noise floor: {rows[0]['win_rate']:.3f})")
    print(f"store: {store.root} ({store.count()} pairs) | metrics: {run_dir / METRICS_FILE} | report: {md}")
    print(f"run_dir: {run_dir}")
    return 0


# ------------------------------------------------------------------ set-up


def task_prompts(cfg: RunConfig, run_dir: Path) -> tuple[str, str]:
    """Training and eval prompt files: the configured ones, or the style task's."""
    from raydpo.online import write_prompts
    from raydpo.tasks import style

    train, held_out = style.split_prompts(cfg.seed)
    tp = cfg.loop.prompts_path or str(write_prompts(run_dir / "prompts" / "train.jsonl", train))
    ep = cfg.loop.eval_prompts_path or str(write_prompts(run_dir / "prompts" / "eval.jsonl", held_out))
    for key, p in (("loop.prompts_path", tp), ("loop.eval_prompts_path", ep)):
        if not Path(p).exists():
            raise ConfigError(f"{key}: {p} does not exist")
    return tp, ep


def sft_stage(cfg: RunConfig, base: Path, run_dir: Path, pad_id: int) -> Path:
    """The SFT policy the loop starts from (and anchors to): Ray Train on mixed-quality
    demonstrations (data.train_path if given, else the style task's); resumable."""
    if cfg.trainer.sft_steps == 0:
        return base
    from raydpo.runner import read_tokenized
    from raydpo.tasks import style
    from raydpo.train.trainer import fit, make_spec

    source = cfg.data.train_path
    if source is None:
        source = run_dir / "sft_demonstrations.jsonl"
        if not source.exists():
            tmp = source.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for r in style.sft_records(20_000, cfg.seed):
                    f.write(json.dumps(r) + "\n")
            tmp.replace(source)
    ds = read_tokenized(cfg, str(source), base)
    return fit(make_spec(cfg, "sft", str(base), str(run_dir)), ds, cfg, "sft", pad_id)


def warn_overlap(eval_prompts: list[str], train_prompts: list[str]) -> int:
    """How many eval prompts are also training prompts; warns if any are."""
    overlap = len(set(eval_prompts) & set(train_prompts))
    if overlap:
        log(f"WARNING: {overlap} of the {len(eval_prompts)} eval prompts are also training prompts: the win rate "
            f"then partly measures memorisation; use eval prompts disjoint from loop.prompts_path")
    return overlap


def deploy_judge(cfg: RunConfig):
    """The judge app on Ray Serve (HTTP on cluster.host:port/judge, and a handle for the loop)."""
    from ray import serve

    from raydpo.serve_judge import build_app

    from raydpo.runner import outliving_path

    j, res = cfg.judge, cfg.cluster.judge
    if j.model_path:  # the judge app outlives this job, and its replicas run elsewhere: an absolute path
        j = j.model_copy(update={"model_path": str(outliving_path(j.model_path, "judge.model_path"))})
    serve.start(http_options={"host": cfg.cluster.host, "port": cfg.cluster.port})
    if j.kind == "llm":
        from raydpo.serve_llm_judge import build_app as build_llm_app

        require(cfg, "judge.model_path", by="judge.kind=llm")
        app = build_llm_app({"model_path": j.model_path, "template": j.template, "answer_pattern": j.answer_pattern,
                             "answers": j.answers, "max_new_tokens": j.max_new_tokens,
                             "max_model_len": cfg.sampler.max_model_len, "kv_cache_gib": cfg.sampler.kv_cache_gib,
                             "num_cpus": res.cpus, "trust_remote_code": cfg.model.trust_remote_code,
                             **res.serve_scaling()})
    elif j.kind == "reward_model":
        require(cfg, "judge.model_path", by="judge.kind=reward_model")
        app = build_app({"reward_model": j.model_path, "tie_margin": j.tie_margin, "num_cpus": res.cpus,
                         "max_prompt_length": cfg.data.max_prompt_length, "max_length": cfg.data.max_length,
                         **res.serve_scaling()})
    else:
        app = build_app({"rule": j.rule, "tie_margin": j.tie_margin, "num_cpus": res.cpus, **res.serve_scaling()})
    return serve.run(app, name="judge", route_prefix="/judge")


# What a batch of samples is for: part of every sample's seed, so the streams never share draws.
TRAIN, BASELINE, EVAL, KL = 1, 2, 3, 4


def sampling(cfg: RunConfig, n: int, temperature: float):
    from raydpo.records import SamplingSettings

    return replace(SamplingSettings.from_config(cfg.sampler), n=n, temperature=temperature, seed=None)


def prompt_seeds(cfg: RunConfig, purpose: int, it: int, positions) -> list[int]:
    """One seed per prompt from (run seed, purpose, iteration, the prompt's position in its
    window); sample j of a prompt draws with derive_seed(that, j). So every sample's draws are
    fixed by what it is, whichever engine, chunk or resumed run produces it."""
    from raydpo.records import derive_seed

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
        raise RuntimeError("baseline samples must come from the starting policy (version 0)")
    samples = pool.sample(prompts, sampling(cfg, k, cfg.loop.eval_temperature),
                          seeds=prompt_seeds(cfg, BASELINE, 0, range(len(prompts))))
    groups = [[s.text for s in samples[i * k:(i + 1) * k]] for i in range(len(prompts))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p, "responses": g}) + "\n" for p, g in zip(prompts, groups)))
    tmp.replace(path)
    return groups


# ------------------------------------------------------------------ one iteration


def collect_pairs(cfg: RunConfig, it: int, prompts, pool, judge, store, timer: Timer, version: int):
    """Steps 1-5 for iteration `it`, sampling from policy `version`: returns the
    PairCounts of the chunks done now plus those found already stored (a resumed
    iteration, or one pre-sampled by the offline baseline)."""
    from raydpo.online import build_pairs

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
    if pool.version != version:
        raise RuntimeError(f"iteration {it} wants samples of policy version {version}; the pool is at {pool.version}")
    stream = pool.stream(flat, sampling(cfg, k, cfg.sampler.temperature), min_version=version, chunk_size=size,
                         seeds=seeds)
    while True:
        with timer("sample"):
            chunk = next(stream, None)  # the pool keeps sampling the next chunk meanwhile
        if chunk is None:
            break
        j = starts.index(min(s.prompt_index for s in chunk))
        ci = todo[j][0]
        chunk.sort(key=lambda s: (s.prompt_index, s.sample_index))
        groups = [chunk[g * k:(g + 1) * k] for g in range(len(chunk) // k)]
        if any(s.policy_version != version for s in chunk):
            raise RuntimeError(f"iteration {it}: samples from policy versions "
                               f"{sorted({s.policy_version for s in chunk})}, expected {version}")
        with timer("judge"):
            invalid_before = judge.invalid
            ranked = judge.rank([[(s.prompt, s.text) for s in g] for g in groups])
        pairs, c = build_pairs(groups, ranked, iteration=it,
                               first_prompt=ci * size, judge=judge.name, mode=cfg.loop.pairs,
                               tie_margin=cfg.judge.tie_margin, pair_margin=cfg.loop.pair_margin)
        c.invalid = judge.invalid - invalid_before
        with timer("store"):
            store.write_chunk(it, ci, pairs, counts=asdict(c))  # durable before anything else happens to them
        counts.add(c)
    return counts


def prune_step_metrics(run_dir: Path, trained_upto: int) -> None:
    """Drop per-step lines of online iterations after `trained_upto` from metrics.jsonl
    (atomically), so that a resumed run does not log the same steps twice."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)

    def keep_line(line: str) -> bool:
        try:
            return json.loads(line).get("online/iteration", 0) <= trained_upto
        except json.JSONDecodeError:  # the last line of a killed writer
            return False

    keep = [line for line in lines if keep_line(line)]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def _stored_pairs(store, it: int, chunk: int | None = None) -> int:
    import pyarrow.parquet as pq

    files = [store.chunk_path(it, chunk)] if chunk is not None else store.chunk_files([it])
    return sum(pq.read_metadata(f).num_rows for f in files)


def counts_row(counts) -> dict:
    """A metrics row's judging columns from PairCounts."""
    return {"pairs": counts.pairs, "ties_dropped": counts.ties, "identical_dropped": counts.identical,
            "below_margin_dropped": counts.below_margin, "invalid_comparisons": counts.invalid,
            "unranked_samples": counts.unranked, "prompts": counts.prompts, "samples": counts.samples}


def stored_counts(store, it: int, chunks: list[int] | None = None):
    """PairCounts of iteration `it`'s chunks already in the store (all of them, or those of
    `chunks` that are there): each chunk's judging counts were saved in its metadata."""
    from raydpo.online import PairCounts

    counts = PairCounts()
    found = [int(f.stem.removeprefix("chunk-")) for f in store.chunk_files([it])] if chunks is None else chunks
    for ci in found:
        if store.has_chunk(it, ci):
            saved = store.chunk_counts(it, ci)
            counts.add(PairCounts(**saved) if saved else PairCounts(pairs=_stored_pairs(store, it, ci)))
    return counts


def trained_row(cfg: RunConfig, store, run_dir: Path, it: int) -> dict:
    """The metrics of iteration `it`, trained before a driver died but not evaluated, as an
    uninterrupted run wrote them: judging counts from the chunks' metadata, what training
    kept from the store, and the trainer's reply from the checkpoint (timings are not kept)."""
    row = {**counts_row(stored_counts(store, it)), **training_table(cfg, store, it)[1]}
    reply = saved_reply(run_dir, it)
    if reply:
        row.update(train_steps=reply["steps"], trained_pairs=reply["pairs"], **dpo_metrics(reply["metrics"]))
    else:  # a checkpoint written before replies were saved with it
        row.update(dpo_metrics(_logged_last_pass(run_dir, it, cfg.loop.dpo_passes)))
    return row


def saved_reply(run_dir: Path, it: int) -> dict | None:
    """The trainer's reply for iteration `it`, saved in its checkpoint's trainer_state.json."""
    path = run_dir / "ray_train" / "online" / f"iter-{it:06d}" / "trainer_state.json"
    return json.loads(path.read_text()).get("reply") if path.exists() else None


def training_data(cfg: RunConfig, store, it: int) -> tuple[object, dict]:
    """`training_table` as a materialized Ray Dataset, and what was kept."""
    import ray.data

    rows, stats = training_table(cfg, store, it)
    return ray.data.from_arrow(rows).materialize(), stats


def training_table(cfg: RunConfig, store, it: int) -> tuple[object, dict]:
    """The iteration's pairs from the store (+ a replay sample of earlier ones) as training rows
    on the sampler's own token ids (`raydpo.data.store.training_rows`), and what was kept."""
    import pyarrow as pa

    from raydpo.data.store import training_rows

    fresh, counts = training_rows(store.read_table([it]), cfg.loop.truncated, cfg.data.max_length)
    cap = cfg.loop.max_pairs_per_iteration
    if cap:
        fresh = fresh.slice(0, cap)
    parts = [fresh]
    n_replay = round(cfg.loop.replay_fraction * fresh.num_rows)
    earlier = list(range(1, it))
    if n_replay and earlier and store.chunk_files(earlier):
        old, _ = training_rows(store.read_table(earlier), cfg.loop.truncated, cfg.data.max_length)
        if n_replay < old.num_rows:
            import numpy as np

            idx = np.sort(np.random.default_rng(cfg.seed + it).choice(old.num_rows, size=n_replay, replace=False))
            old = old.take(pa.array(idx))
        parts.append(old)
    rows = pa.concat_tables(parts)
    stats = {"truncated_pairs": counts.truncated, "truncated_dropped": counts.truncated_dropped,
             "over_length_dropped": counts.over_length_dropped, "replayed_pairs": rows.num_rows - fresh.num_rows}
    return rows, stats


def dpo_metrics(m: dict) -> dict:
    keys = {"loss": "dpo_loss", "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
            "kl_estimate": "train_log_ratio"}
    return {new: m[old] for old, new in keys.items() if old in m}


def _logged_last_pass(run_dir: Path, it: int, passes: int) -> dict:
    """Mean of the last pass's per-step metrics of iteration `it`, from metrics.jsonl."""
    steps = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("online/iteration") == it:
                steps.append({k.removeprefix("online/"): v for k, v in r.items() if k.startswith("online/")})
    last = steps[-(len(steps) // passes):] if steps and len(steps) >= passes else steps
    return {k: statistics.mean(s[k] for s in last) for k in (last[0] if last else {})}


def evaluate(cfg: RunConfig, it: int, pool, judge, trainer, prompts: list[str],
             baseline: list[list[str]]) -> dict:
    """Win rate of the current policy against the starting policy's fixed samples
    (both orders, ties half), mean judge score and length, and KL to the reference."""
    from raydpo.online import win_rate

    samples = pool.sample(prompts, sampling(cfg, 1, cfg.loop.eval_temperature),
                          seeds=prompt_seeds(cfg, EVAL, it, range(len(prompts))))
    wr = win_rate(judge, prompts, [s.text for s in samples], baseline)
    scores = [] if judge.pairwise else judge.score([(s.prompt, s.text) for s in samples])
    out = {"win_rate": wr.win_rate, "wins": wr.wins, "ties": wr.ties, "losses": wr.losses, "invalid": wr.invalid,
           "judge_score": statistics.mean(scores) if scores else float("nan"),
           "response_tokens": statistics.mean(len(s.token_ids) for s in samples)}
    if cfg.loop.eval_kl and it > 0:
        hot = pool.sample(prompts, sampling(cfg, 1, 1.0), seeds=prompt_seeds(cfg, KL, it, range(len(prompts))))
        # the sampler's own ids: the trainer scores exactly the context and tokens that were sampled
        out["kl"] = trainer.kl([list(s.prompt_token_ids) for s in hot], [list(s.token_ids) for s in hot])["kl"]
    elif it == 0:
        out["kl"] = 0.0
    return out


# Keys a resumed run may change: they alter neither what is sampled, judged and stored
# for an iteration nor how it is trained, so the store's exactly-once guarantee and the
# run's meaning hold. Every other key must match the run's saved config.yaml. The trainer's
# worker count is not among them: DeepSpeed shards and DDP's split of a batch depend on it.
RESUME_MAY_CHANGE = ("loop.iterations", "loop.serve_policy", "trainer.stall_timeout_s", "trainer.max_failures",
                     "sampler.sync_timeout_s", "sampler.request_timeout_s", "sampler.kv_cache_gib", "cluster.")
RESUME_MUST_KEEP = ("cluster.trainer.count", "cluster.trainer.gpus")


def check_run_dir(cfg: RunConfig, resume: bool) -> None:
    """A run_dir that holds an online run (metrics or checkpoints) is only continued with
    --resume, and only under the config it was started with (up to RESUME_MAY_CHANGE)."""
    from raydpo.config import changed_keys, read_saved_config

    run_dir = Path(cfg.run_dir).resolve()
    if not resume and ((run_dir / METRICS_FILE).exists() or (run_dir / "ray_train").exists()):
        raise ConfigError(f"run_dir {run_dir} already holds an online run; pass --resume to continue it "
                          f"or choose another run_dir")
    saved = read_saved_config(run_dir) if resume else None
    if saved is None:
        return
    diff = changed_keys(saved, cfg.model_dump(mode="json"))
    diff.pop("run_dir", None)  # the same folder, perhaps spelled differently
    refused = {k: v for k, v in diff.items() if not k.startswith(RESUME_MAY_CHANGE) or k in RESUME_MUST_KEEP}
    if refused:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(f"--resume: {run_dir / 'config.yaml'} was started with other values of keys that "
                          f"change what is sampled, judged or trained: {shown}. Resume with the saved values, "
                          f"or start a new run_dir. Only {', '.join(RESUME_MAY_CHANGE)}* (but not "
                          f"{', '.join(RESUME_MUST_KEEP)}) may change.")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from raydpo.config import load_config, save_config
    from raydpo.data.formats import DataError

    parser = argparse.ArgumentParser(prog="online_dpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML config; omitted keys keep their (demo) defaults")
    parser.add_argument("--resume", action="store_true", help="continue the run in run_dir from its last iteration")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. loop.iterations=4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from raydpo.runner import outliving_path

        log(f"run_dir: {outliving_path(cfg.run_dir)}")
        check_run_dir(cfg, args.resume)  # before save_config overwrites the run's own config
        save_config(cfg, cfg.run_dir)
        return run(cfg, resume=args.resume)
    except (ConfigError, DataError) as e:  # named problem, no traceback
        print(f"online_dpo: error: {e}", file=sys.stderr)
        return 2
