"""Helpers shared by the bench scripts (run as `python bench/X.py`, so this folder is on sys.path)."""

import time

import torch


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """fp32 matmul FLOP/s this machine reaches with torch's current thread count: the MFU denominator."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t)
