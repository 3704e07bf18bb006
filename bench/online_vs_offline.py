"""Online DPO vs offline DPO with the same judged-pair budget, on the embedded demo task.

    python bench/online_vs_offline.py [--iterations 12] [--seed 0]

1. the main job on its defaults (SFT, then online iterations: fresh pairs from the
   current policy each iteration);
2. the same job starting from the *same* SFT checkpoint with loop.pairs_from=start:
   every pair is sampled once, before iteration 1, from the starting policy (the
   offline baseline), and each iteration trains on at most as many pairs as the
   online run had on average, with the same passes, β and learning rate;
3. both evaluated the same way (held-out prompts, win rate against the same fixed
   starting-policy samples, both orders, ties half).

The field's claim is that online wins (the offline pool goes stale as the policy
moves). The script prints both final win rates and whether that holds here.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(run_dir: Path, *overrides: str) -> tuple[list[dict], float]:
    t = time.time()
    r = subprocess.run([sys.executable, "jobs/online_dpo.py", f"run_dir={run_dir}", *overrides], cwd=REPO,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"run {run_dir} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "online_metrics.jsonl").read_text().splitlines()]
    return rows, time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep the two runs here (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="raydpo-bench-"))
    common = [f"seed={args.seed}", f"loop.iterations={args.iterations}"]

    online, t_on = run(out / "online", *common)
    sft = out / "online" / "ray_train" / "sft" / "sft-step-001000"
    trained_online = sum(r.get("trained_pairs", 0) for r in online)
    per_iteration = round(trained_online / args.iterations)
    offline, t_off = run(out / "offline", *common, f"model.path={sft}", "trainer.sft_steps=0",
                         "loop.pairs_from=start", f"loop.max_pairs_per_iteration={per_iteration}")
    trained_offline = sum(r.get("trained_pairs", 0) for r in offline)

    print("\n| iteration | online win | offline win | online pairs | offline pairs |\n|---:|---:|---:|---:|---:|")
    for a, b in zip(online, offline):
        print(f"| {a['iteration']} | {a['win_rate']:.3f} | {b['win_rate']:.3f} | {a.get('trained_pairs', 0)} "
              f"| {b.get('trained_pairs', 0)} |")
    won, woff = online[-1]["win_rate"], offline[-1]["win_rate"]
    print(f"\nonline {won:.3f} vs offline {woff:.3f} after {args.iterations} iterations "
          f"({trained_online} vs {trained_offline} pairs trained on): "
          f"{'online wins' if won > woff else 'online does NOT win'} here. Runs in {out}")
    print(f"RESULT iterations={args.iterations} online_win={won:.3f} offline_win={woff:.3f} "
          f"online_pairs={trained_online} offline_pairs={trained_offline} ratio={won / woff:.3f} "
          f"online_s={t_on:.0f} offline_s={t_off:.0f}")


if __name__ == "__main__":
    main()
