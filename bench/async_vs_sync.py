"""The synchronous loop (loop.max_staleness=0) against sampling ahead (max_staleness=1), on
the embedded demo task, with the same seed, placement, iterations and pair budget.

    python bench/async_vs_sync.py [--seeds 0] [--iterations 12] [--sft PATH] [--out DIR]

1. the SFT stage once per seed (the main job's own, `jobs/sft.py` on the demo defaults),
   unless --sft names a checkpoint;
2. from that checkpoint, the online loop twice per seed: max_staleness=0 (the baseline)
   and 1. Both on disjoint CPUs, as separate pools on a cluster would be: the trainer
   worker pinned to CPU 0 with one thread, the sampler engine to CPU 1
   (cluster.<role>.cpu_ids); the driver, judge and Ray's own processes float;
3. loop time: from the end of iteration 0's evaluation to the end of the last
   iteration's (the rows' time_done), so role start-up, equal in both, is left out.
   Both evaluate every iteration on the same held-out prompts against the same fixed
   starting-policy samples.

Ends with `RESULT sync_s=... async_s=... ratio=... sync_win=... async_win=...`
(ratio = sync_s / async_s; with several seeds, the means, and one line per seed above).
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import PLACEMENT, run_script as run


def loop(run_dir: Path, sft: Path, seed: int, iterations: int, staleness: int) -> dict:
    wall = run(["jobs/online_dpo.py", f"run_dir={run_dir}", f"seed={seed}", f"loop.iterations={iterations}",
                f"model.path={sft}", "trainer.sft_steps=0", f"loop.max_staleness={staleness}", *PLACEMENT],
               f"seed {seed}, max_staleness={staleness}")
    rows = [json.loads(line) for line in (run_dir / "online_metrics.jsonl").read_text().splitlines()]
    return {"loop_s": rows[-1]["time_done"] - rows[0]["time_done"], "win": rows[-1]["win_rate"], "wall_s": wall,
            "pairs": sum(r.get("trained_pairs", 0) for r in rows), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--sft", default=None, help="an SFT checkpoint of the demo task, to skip the SFT stage; "
                    "{seed} in it is each seed's (e.g. OUT/sft-{seed}/ray_train/sft/sft-step-001000 of an earlier run)")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="raydpo-async-"))
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        sft = Path(args.sft.format(seed=seed)) if args.sft else None
        if sft is None:
            run(["jobs/sft.py", f"run_dir={out / f'sft-{seed}'}", f"seed={seed}"], f"seed {seed}: SFT stage")
            sft = max((out / f"sft-{seed}" / "ray_train" / "sft").glob("sft-step-*"))
        sync = loop(out / f"sync-{seed}", sft, seed, args.iterations, 0)
        ahead = loop(out / f"async-{seed}", sft, seed, args.iterations, 1)
        results.append((seed, sync, ahead))

    print("\n| seed | mode | loop s | final win | trained pairs | mean s/iteration: wait, train, sync, eval |")
    print("|---:|---|---:|---:|---:|---|")
    for seed, *modes in results:
        for name, m in zip(("sync", "async k=1"), modes):
            it = m["rows"][1:]
            mean = {k: statistics.mean(r.get(f"time_{k}", 0.0) for r in it) for k in ("wait", "train", "sync", "eval")}
            print(f"| {seed} | {name} | {m['loop_s']:.1f} | {m['win']:.3f} | {m['pairs']} | "
                  + ", ".join(f"{v:.2f}" for v in mean.values()) + " |")
    hist = [0] * 2
    for _, _, a in results:
        for r in a["rows"][1:]:
            for s, n in enumerate(r.get("staleness_hist", [])):
                hist[s] += n
    print(f"\nasync staleness over all trained pairs: {hist[0]} from the current version, {hist[1]} one behind; "
          f"dropped as too stale: {sum(r.get('stale_dropped', 0) for _, _, a in results for r in a['rows'])}")
    for seed, s, a in results:
        print(f"seed {seed}: sync_s={s['loop_s']:.1f} async_s={a['loop_s']:.1f} ratio={s['loop_s'] / a['loop_s']:.2f} "
              f"sync_win={s['win']:.3f} async_win={a['win']:.3f}")
    sync_s = statistics.mean(s["loop_s"] for _, s, _ in results)
    async_s = statistics.mean(a["loop_s"] for _, _, a in results)
    print(f"RESULT sync_s={sync_s:.1f} async_s={async_s:.1f} ratio={sync_s / async_s:.2f} "
          f"sync_win={statistics.mean(s['win'] for _, s, _ in results):.3f} "
          f"async_win={statistics.mean(a['win'] for _, _, a in results):.3f} seeds={len(results)}")


if __name__ == "__main__":
    main()
