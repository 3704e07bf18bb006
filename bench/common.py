"""Helpers shared by the bench scripts (run as `python bench/X.py`, so this folder is on sys.path)."""

import time

import torch


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
