"""Step 6's input: an iteration's pairs (and a replay sample of earlier ones) from the store,
as training rows on the sampler's own token ids."""

from __future__ import annotations

from raydpo.config import RunConfig


def pairs_version(cfg: RunConfig, it: int) -> int:
    """The policy version iteration `it` trains from, and samples its pairs from when the loop
    is synchronous: the one before it (online), or 0 (the offline baseline, loop.pairs_from=start)."""
    return it - 1 if cfg.loop.pairs_from == "current" else 0


def within_staleness(table, trains_from: int, max_staleness: int) -> tuple[object, dict]:
    """The stored pairs sampled at most `max_staleness` versions before `trains_from`, the
    version about to train on them; the rest are left out and counted. Also a histogram of
    the kept pairs' staleness (index s: pairs sampled by version trains_from - s)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lag = pc.subtract(pa.scalar(trains_from, pa.int64()), table.column("policy_version"))
    ok = pc.and_(pc.greater_equal(lag, 0), pc.less_equal(lag, max_staleness))
    kept = table.filter(ok)
    kept_lag = lag.filter(ok).to_pylist()
    hist = [kept_lag.count(s) for s in range(max_staleness + 1)]
    return kept, {"stale_dropped": table.num_rows - kept.num_rows, "staleness_hist": hist}


def warm_up_ray_data():
    """Ray Data's first execution in a driver costs far more than later ones: pay it in a thread
    while the roles start, not in iteration 1's training. Join the returned thread before the
    first iteration.

    That includes Ray Data's stats actor, which the first execution only asks Ray to create: its
    worker process starts (imports Ray Data: 0.8 s of CPU measured on 2 cores) after
    `materialize` has returned, so the warm-up waits for it too, or iteration 1's trainer shares
    its CPU with that start."""
    import threading

    def warm() -> None:
        import pyarrow as pa
        import ray
        import ray.data

        ray.data.from_arrow(pa.table({"x": [0]})).materialize()
        try:  # not public API, and nothing waits on the actor otherwise: never let it stop or hold the run
            from ray.data._internal.stats import get_or_create_stats_actor

            ray.get(get_or_create_stats_actor().__ray_ready__.remote(), timeout=60)
        except Exception:  # a warm-up only: Ray Data runs without waiting for the actor
            pass

    thread = threading.Thread(target=warm, name="raydpo-warm-ray-data", daemon=True)
    thread.start()
    return thread


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

    table, staleness = within_staleness(store.read_table([it]), pairs_version(cfg, it), cfg.loop.max_staleness)
    fresh, counts = training_rows(table, cfg.loop.truncated, cfg.data.max_length)
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
    stats = {**staleness, "truncated_pairs": counts.truncated, "truncated_dropped": counts.truncated_dropped,
             "over_length_dropped": counts.over_length_dropped, "replayed_pairs": rows.num_rows - fresh.num_rows}
    return rows, stats


def dpo_metrics(m: dict) -> dict:
    keys = {"loss": "dpo_loss", "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
            "kl_estimate": "train_log_ratio"}
    return {new: m[old] for old, new in keys.items() if old in m}

