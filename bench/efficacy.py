"""Does online DPO improve the policy on every seed, and beat offline DPO? The demo on seeds 0, 1, 2.

    python bench/efficacy.py [--seeds 0 1 2] [--iterations 12] [--out DIR] [--online-only] [--set key=value ...]

For each seed:
1. the main job on its defaults (`jobs/online_dpo.py seed=S`): its own SFT stage
   (the seed also picks the task's train/eval prompt split, so no SFT checkpoint is
   shared between seeds), then online iterations;
2. the offline baseline from that run's SFT checkpoint: `loop.pairs_from=start`
   (every pair sampled once, from the starting policy) with at most as many pairs per
   iteration as the online run trained on, same passes, beta and learning rate.

Prints every seed's curve (win rate against the starting policy, KL, response
length) and ends with

    RESULT seeds=3 min_online_win=... mean_online_win=... mean_offline_win=...
           mean_gap=... worst_win_after_it3=... max_kl=... ratio=...

worst_win_after_it3 is the lowest win rate at any iteration >= 3 of any online
run; ratio is mean online / mean offline final win (the baseline). Targets on the
2-core reference machine: every seed ends >= 0.85, worst_win_after_it3 >= 0.70,
mean gap >= 5 points.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from online_vs_offline import run

TARGETS = {"min_online_win": 0.85, "worst_win_after_it3": 0.70, "mean_gap": 0.05}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--online-only", action="store_true", help="skip the offline baselines (no gap figures)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="config overrides for every run, to measure a change of defaults on all seeds")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="raydpo-efficacy-"))
    t0 = time.time()
    curves: dict[int, tuple[list[dict], list[dict]]] = {}
    for seed in args.seeds:
        common = [f"seed={seed}", f"loop.iterations={args.iterations}", *args.set]
        print(f"[efficacy] seed {seed}: online ({time.time() - t0:.0f}s)", flush=True)
        online, _ = run(out / f"seed{seed}" / "online", *common)
        offline: list[dict] = []
        if not args.online_only:
            sft = sorted((out / f"seed{seed}" / "online" / "ray_train" / "sft").glob("sft-step-*"))[-1]
            per_iteration = round(sum(r.get("trained_pairs", 0) for r in online) / args.iterations)
            print(f"[efficacy] seed {seed}: offline, {per_iteration} pairs/iteration ({time.time() - t0:.0f}s)",
                  flush=True)
            offline, _ = run(out / f"seed{seed}" / "offline", *common, f"model.path={sft}", "trainer.sft_steps=0",
                             "loop.pairs_from=start", f"loop.max_pairs_per_iteration={per_iteration}")
        curves[seed] = (online, offline)
        print(f"[efficacy] seed {seed}: online {online[-1]['win_rate']:.3f}"
              + (f", offline {offline[-1]['win_rate']:.3f}" if offline else ""), flush=True)

    for seed, (online, offline) in curves.items():
        print(f"\nseed {seed}\n| iteration | online win | KL | response tokens | cut pairs | offline win |\n"
              "|---:|---:|---:|---:|---:|---:|")
        for i, a in enumerate(online):
            b = offline[i]["win_rate"] if i < len(offline) else float("nan")
            print(f"| {a['iteration']} | {a['win_rate']:.3f} | {a.get('kl', 0.0):.2f} | "
                  f"{a.get('response_tokens', 0.0):.1f} | {a.get('truncated_pairs', 0)} | {b:.3f} |")

    finals = [c[0][-1]["win_rate"] for c in curves.values()]
    offline_finals = [c[1][-1]["win_rate"] for c in curves.values() if c[1]]
    worst = min(r["win_rate"] for online, _ in curves.values() for r in online if r["iteration"] >= 3)
    max_kl = max(r.get("kl", 0.0) for online, _ in curves.values() for r in online)
    result = {"seeds": len(curves), "min_online_win": min(finals), "mean_online_win": statistics.mean(finals),
              "worst_win_after_it3": worst, "max_kl": max_kl}
    if offline_finals:
        result["mean_offline_win"] = statistics.mean(offline_finals)
        result["mean_gap"] = result["mean_online_win"] - result["mean_offline_win"]
        result["ratio"] = result["mean_online_win"] / result["mean_offline_win"]
    print("\n| target | value | needed | met |\n|---|---:|---:|---|")
    for k, need in TARGETS.items():
        if k in result:
            print(f"| {k} | {result[k]:.3f} | >= {need:.2f} | {'yes' if result[k] >= need else 'NO'} |")
    print(f"\nruns in {out}; {time.time() - t0:.0f}s in all")
    print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
          + f" seconds={time.time() - t0:.0f}")


if __name__ == "__main__":
    main()
