"""Step 6's input: an iteration's pairs (and a replay sample of earlier ones) from the store,
as training rows on the sampler's own token ids."""

from __future__ import annotations

from raydpo.config import RunConfig


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

