"""The online demo on a larger built model (`model.preset`), end to end, with the time per
phase and the peak memory of each role, against the tiny preset as the baseline.

    python bench/preset_loop.py [--preset small] [--iterations 2] [--sft-steps 100] [--out DIR]

Each side is one `python jobs/online_dpo.py model.preset=P ...` from scratch (tokenizer and
model built, SFT, the online loop), with the demo's defaults but `--iterations` and
`--sft-steps`. While it runs, a monitor samples every process every 0.5 s (psutil) and keeps
the peak resident memory (RSS) of each role, found by the title Ray gives its processes:
the Ray Train worker (SFT and DPO), the vLLM sampler actor, the judge and the policy Serve
replicas, and the driver. RSS counts shared pages a process has touched (the object
store's, and a vLLM engine's KV cache as it fills), so roles on one node do not sum to the
node's use.

Ends with `RESULT preset=... params_m=... sft_s=... iteration_s=... trainer_gb=...
sampler_gb=... judge_gb=... policy_gb=... driver_gb=... ratio=...` (ratio = the mean
seconds per online iteration against the tiny preset's, in the same run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from common import REPO

ROLES = {"trainer": "ray::RayTrainWorker", "sampler": "ray::SamplerActor", "judge": "ray::ServeReplica:judge",
         "policy": "ray::ServeReplica:policy"}
PHASES = ("sample", "judge", "train", "sync", "eval")


class PeakRSS:
    """Peak RSS per role, sampled in a thread while a run goes on."""

    def __init__(self, driver_pid: int, every_s: float = 0.5):
        self.driver_pid, self.every_s = driver_pid, every_s
        self.peak = {role: 0 for role in (*ROLES, "driver")}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _role(self, p: psutil.Process) -> str | None:
        if p.pid == self.driver_pid:
            return "driver"
        title = " ".join(p.cmdline()[:1])
        return next((role for role, prefix in ROLES.items() if title.startswith(prefix)), None)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in psutil.process_iter():
                try:
                    role = self._role(p)
                    if role:
                        self.peak[role] = max(self.peak[role], p.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(out: Path, preset: str, iterations: int, sft_steps: int) -> dict:
    run_dir = out / preset
    args = [sys.executable, "jobs/online_dpo.py", f"run_dir={run_dir}", f"model.preset={preset}",
            f"loop.iterations={iterations}", f"trainer.sft_steps={sft_steps}"]
    print(f"[bench] model.preset={preset}: SFT {sft_steps} steps, {iterations} online iterations ...", flush=True)
    t = time.time()
    with open(out / f"{preset}.log", "w") as log:
        p = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        with PeakRSS(p.pid) as mem:
            p.wait()
    wall = time.time() - t
    text = (out / f"{preset}.log").read_text()
    if p.returncode:
        sys.exit(f"preset {preset} failed:\n{text[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "online_metrics.jsonl").read_text().splitlines()]
    online = rows[1:]
    from safetensors import safe_open

    with safe_open(run_dir / "base_model" / "model.safetensors", "np") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    # the SFT stage: from the base model's line to the starting policy's (the job's own timestamps)
    stamps = {}
    for line in text.splitlines():
        for key in ("task and base model ready", "starting policy"):
            if line.startswith("[online] " + key) and line.rstrip().endswith("s)"):
                stamps[key] = float(line.rsplit("(", 1)[1].rstrip("s)"))
    return {"preset": preset, "params": params, "wall": wall, "win0": rows[0]["win_rate"], "win": rows[-1]["win_rate"],
            "sft_s": stamps.get("starting policy", float("nan")) - stamps.get("task and base model ready", 0.0),
            "iteration_s": sum(r["time_total"] for r in online) / len(online),
            "phases": {k: sum(r.get(f"time_{k}", 0.0) for r in online) / len(online) for k in PHASES},
            "rss": dict(mem.peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=("small", "medium"))
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="raydpo-preset-"))
    out.mkdir(parents=True, exist_ok=True)
    base = run(out, "tiny", args.iterations, args.sft_steps)
    big = run(out, args.preset, args.iterations, args.sft_steps)

    gb = 1024 ** 3
    print(f"\n| preset | parameters | SFT s ({args.sft_steps} steps) | s/iteration | "
          + " | ".join(f"{k} s" for k in PHASES) + " | win: start -> last |")
    print("|---|---:|---:|---:|" + "---:|" * len(PHASES) + "---|")
    for r in (base, big):
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['sft_s']:.0f} | {r['iteration_s']:.1f} | "
              + " | ".join(f"{r['phases'][k]:.1f}" for k in PHASES) + f" | {r['win0']:.2f} -> {r['win']:.2f} |")
    print("\n| preset | " + " | ".join(f"{role} peak RSS GiB" for role in big["rss"]) + " |")
    print("|---|" + "---:|" * len(big["rss"]))
    for r in (base, big):
        print(f"| {r['preset']} | " + " | ".join(f"{v / gb:.2f}" for v in r["rss"].values()) + " |")
    print(f"runs: {out} ({os.cpu_count()} cores)")
    print(f"RESULT preset={big['preset']} params_m={big['params'] / 1e6:.1f} sft_s={big['sft_s']:.0f} "
          f"iteration_s={big['iteration_s']:.1f} "
          + " ".join(f"{role}_gb={v / gb:.2f}" for role, v in big["rss"].items())
          + f" tiny_iteration_s={base['iteration_s']:.1f} ratio={big['iteration_s'] / base['iteration_s']:.2f}")


if __name__ == "__main__":
    main()
