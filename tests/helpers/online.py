"""What the end-to-end tests of the online loop share: a small config and the checks
every finished run must pass."""

import json
from pathlib import Path

from raydpo.data.store import PreferenceStore


def small_config(run_dir: Path, serve_port: int, **extra) -> list[str]:
    args = {"run_dir": str(run_dir), "loop.iterations": 2, "loop.prompts_per_iteration": 16, "loop.chunk_prompts": 4,
            "loop.eval_prompts": 24, "trainer.sft_steps": 40, "trainer.sft_batch_size": 32, "cluster.port": serve_port,
            "cluster.trainer.cpus": 2, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def check_run(run_dir: Path, iterations: int, prompts: int, chunks: int, max_staleness: int = 0) -> list[dict]:
    """What every finished run must hold, consistent across store, checkpoints, metrics and report."""
    raw = [json.loads(line) for line in (run_dir / "online_metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in raw] == list(range(iterations + 1))  # each iteration once, in order
    table = PreferenceStore(run_dir / "preferences").read_table()
    rows = table.to_pylist()
    assert len({r["pair_id"] for r in rows}) == len(rows) > 0  # no duplicates
    for it in range(1, iterations + 1):
        mine = [r for r in rows if r["iteration"] == it]
        # sampled by the previous iteration's weights, or with max_staleness k, by one at most k before it
        assert all(it - 1 - max_staleness <= r["policy_version"] <= it - 1 for r in mine)
        assert raw[it]["stale_dropped"] == 0 and len(raw[it]["staleness_hist"]) == max_staleness + 1
        assert sum(raw[it]["staleness_hist"]) == raw[it]["trained_pairs"]  # the histogram counts what trained
        assert len(mine) == raw[it]["pairs"]  # the metrics count what the store holds
        assert raw[it]["pairs"] <= prompts  # best vs worst: at most one pair per prompt
        files = sorted((run_dir / "preferences" / f"iteration={it:06d}").glob("chunk-*.parquet"))
        assert [f.name for f in files] == [f"chunk-{c:05d}.parquet" for c in range(chunks)]
        ckpt = run_dir / "ray_train" / "online" / f"iter-{it:06d}"
        assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
        assert json.loads((ckpt / "trainer_state.json").read_text())["iteration"] == it
        assert 0.0 <= raw[it]["win_rate"] <= 1.0 and raw[it]["wins"] + raw[it]["ties"] + raw[it]["losses"] > 0
        # trained in this run (time_train > 0), or before a stop that came ahead of the row
        assert raw[it]["train_steps"] > 0 and raw[it]["time_total"] >= raw[it]["time_train"] >= 0
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert not list((run_dir / "preferences" / "_staging").glob("*"))
    assert (run_dir / "report" / "report.md").exists() and (run_dir / "report" / "metrics.png").exists()
    assert (run_dir / "config.yaml").exists()
    return raw
