"""Resume (`--resume`) of an online run, exactly once.

Iterations with a metrics row are done. An iteration whose checkpoint exists but was
not evaluated is published and evaluated, its row rebuilt from what was saved (the
store's chunk metadata, the trainer's reply in the checkpoint). Otherwise its stored
chunks are kept and only the missing chunks are sampled and judged, so every judged
pair is in the store exactly once.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydpo.config import RunConfig
from raydpo.config_io import read_saved_config
from raydpo.errors import ConfigError
from raydpo.files import atomic_write
from raydpo.online.pairs import PairCounts, counts_row
from raydpo.online.training_data import dpo_metrics, training_table
from raydpo.report import METRICS_FILE, read_metrics
from raydpo.train.online_client import latest_iteration_checkpoint


@dataclass(frozen=True)
class ResumePoint:
    """Where a run (re)starts."""

    first: int  # the first iteration to run: every earlier one has a metrics row
    trained_upto: int  # iterations 1..trained_upto have a complete checkpoint
    checkpoint: Path | None  # that checkpoint (the trainer resumes from it)


def iteration_checkpoint(run_dir: Path, it: int) -> Path:
    return Path(run_dir) / "ray_train" / "online" / f"iter-{it:06d}"


def resume_point(run_dir: Path, resume: bool) -> ResumePoint:
    """Read where the run in `run_dir` stopped, and tidy what a kill may have left: per-step
    lines of iterations that will be trained again, and a metrics row cut off mid-line."""
    found = latest_iteration_checkpoint(run_dir / "ray_train") if resume else None
    trained_upto = found[1]["iteration"] if found else 0
    prune_step_metrics(run_dir, trained_upto)  # steps of a killed iteration are trained (and logged) again
    done = read_metrics(run_dir)
    if done:  # rewrite without a line a killed driver may have cut off, so appends start on a fresh line
        atomic_write(run_dir / METRICS_FILE, (json.dumps(r) + "\n" for r in done))
    first = done[-1]["iteration"] + 1 if done else 0
    return ResumePoint(first, trained_upto, found[0] if found else None)


def catch_up(point: ResumePoint, run_dir: Path, pool, policy) -> None:
    """Bring the samplers (and the policy endpoint) to the weights the resumed loop needs:
    iteration `first`'s if it was trained but not evaluated, else the one before `first`.
    (With loop.max_staleness > 0 several trained iterations may wait for evaluation; the
    loop publishes each of the later ones as it reaches it: `publish_trained`.)"""
    target = point.first if point.trained_upto >= point.first else point.first - 1
    if target > 0 and pool.version < target:
        pool.publish(target, path=str(iteration_checkpoint(run_dir, target)))
    if policy and pool.version > 0:
        policy.publish(pool.version, path=str(iteration_checkpoint(run_dir, pool.version)))


def publish_trained(it: int, run_dir: Path, pool, policy) -> None:
    """Iteration `it`, trained before the driver died but not evaluated: its weights to the
    samplers and the policy endpoint, unless they are there already."""
    if pool.version < it:
        path = str(iteration_checkpoint(run_dir, it))
        pool.publish(it, path=path)
        if policy:
            policy.publish(it, path=path)


def changed_keys(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every leaf that differs between two config dumps."""
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(saved) | set(new)):
        a, b = saved.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(changed_keys(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


# Keys a resumed run may change: they alter neither what is sampled, judged and stored
# for an iteration nor how it is trained, so the store's exactly-once guarantee and the
# run's meaning hold (loop.max_staleness: stored pairs staler than the new bound are
# counted as stale_dropped and not trained on, never sampled again). Every other key must match the run's saved config.yaml. The trainer's
# worker count is not among them: DeepSpeed shards and DDP's split of a batch depend on it.
RESUME_MAY_CHANGE = ("loop.iterations", "loop.serve_policy", "loop.max_staleness", "trainer.stall_timeout_s", "trainer.max_failures",
                     "judge.call_timeout_s",  # how long the loop waits for the judge, which its error says to raise
                     "sampler.sync_timeout_s", "sampler.sync_bucket_mb", "sampler.weight_transport", "sampler.request_timeout_s", "sampler.start_timeout_s", "sampler.kv_cache_gib", "cluster.",
                     # how a remote judge is reached, paced and priced, not what it is asked: an outage's fix
                     "judge.remote.base_url", "judge.remote.api_key_env", "judge.remote.max_concurrency",
                     "judge.remote.requests_per_minute", "judge.remote.tokens_per_minute", "judge.remote.timeout_s",
                     "judge.remote.max_retries", "judge.remote.breaker_", "judge.remote.price_", "judge.remote.cache")


RESUME_MUST_KEEP = ("cluster.trainer.count", "cluster.trainer.gpus")


def check_run_dir(cfg: RunConfig, resume: bool) -> None:
    """A run_dir that holds an online run (metrics or checkpoints) is only continued with
    --resume, and only under the config it was started with (up to RESUME_MAY_CHANGE)."""
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
        atomic_write(path, keep)


def _stored_pairs(store, it: int, chunk: int | None = None) -> int:
    import pyarrow.parquet as pq

    files = [store.chunk_path(it, chunk)] if chunk is not None else store.chunk_files([it])
    return sum(pq.read_metadata(f).num_rows for f in files)


def stored_counts(store, it: int, chunks: list[int] | None = None):
    """PairCounts of iteration `it`'s chunks already in the store (all of them, or those of
    `chunks` that are there): each chunk's judging counts were saved in its metadata."""
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
    reply = saved_reply(run_dir, it)
    # what training kept as the driver that trained it counted, saved with its reply (a resume
    # may change loop.max_staleness, under which the store would count other drops); read
    # from the store only for a checkpoint saved without it
    kept = (reply or {}).get("kept") or training_table(cfg, store, it)[1]
    row = {**counts_row(stored_counts(store, it)), **kept}
    if reply:
        row.update(train_steps=reply["steps"], trained_pairs=reply["pairs"], **dpo_metrics(reply["metrics"]))
    else:  # a checkpoint written before replies were saved with it
        last = _logged_last_pass(run_dir, it, cfg.loop.dpo_passes)
        row.update(train_steps=len(last["steps"]) * cfg.loop.dpo_passes if last else 0,
                   **dpo_metrics(last["mean"] if last else {}))
    return row


def saved_reply(run_dir: Path, it: int) -> dict | None:
    """The trainer's reply for iteration `it`, saved in its checkpoint's trainer_state.json."""
    path = iteration_checkpoint(run_dir, it) / "trainer_state.json"
    return json.loads(path.read_text()).get("reply") if path.exists() else None


def _logged_last_pass(run_dir: Path, it: int, passes: int) -> dict:
    """The last pass's per-step metrics of iteration `it` from metrics.jsonl ({"steps", "mean"}; {} if none)."""
    steps = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("online/iteration") == it:
                steps.append({k.removeprefix("online/"): v for k, v in r.items() if k.startswith("online/")})
    last = steps[-(len(steps) // passes):] if steps and len(steps) >= passes else steps
    if not last:
        return {}
    return {"steps": last, "mean": {k: statistics.mean(s[k] for s in last) for k in last[0]}}

