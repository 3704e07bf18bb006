"""Helpers shared by the bench scripts (run as `python bench/X.py`, so this folder is on sys.path)."""

import subprocess
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
# the trainer worker on CPU 0 with one thread, the sampler engine on CPU 1: separate pools on one machine
PLACEMENT = ["cluster.trainer.cpus=1", "cluster.trainer.cpu_ids=[0]", "cluster.sampler.cpus=1",
             "cluster.sampler.cpu_ids=[1]"]


def run_script(cmd: list[str], what: str) -> float:
    """`python <cmd>` from the repository root, its output kept; exits with its tail on failure.
    Returns the wall seconds."""
    t = time.time()
    print(f"[bench] {what} ...", flush=True)
    r = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{what} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return time.time() - t


def matmul_peak_flops(sizes: tuple[int, ...] = (1024, 2048), trials: int = 3, reps: int = 5) -> float:
    """fp32 matmul FLOP/s this machine reaches with torch's current thread count: the MFU denominator.
    The best of a few trials and sizes, so a slow first trial (clock ramp-up, a busy core) does not
    shrink the denominator and inflate every MFU figure."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up
        for _ in range(trials):
            t = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def llama_shape(hidden: int, layers: int, **kw):
    """The benches' Llama shape at a given width and depth: 64-wide heads (no GQA) and an
    MLP of 2.75x the width (512 x 8 layers: the ~26M model the offline and sampling benches use)."""
    from raydpo.config import TinyModelConfig

    return TinyModelConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                           num_key_value_heads=hidden // 64, intermediate_size=int(hidden * 2.75), **kw)


def start_local_ray(num_cpus: int | None = None) -> None:
    """A new local Ray for a bench, as raydpo's own jobs start one (`raydpo.cluster.start_local_ray`),
    with all CPUs unless told otherwise, worker logs and Ray Data progress bars kept out of the
    bench's table. Its start-up is not part of any timing."""
    import os

    import ray

    from raydpo.cluster import start_local_ray

    start_local_ray(num_cpus or os.cpu_count(), log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
