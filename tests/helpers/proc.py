"""Run Python helpers in fresh processes (vLLM and Ray keep global state)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_py(args, timeout, env=None):
    """Run `python ARGS...` from the repo root; return the CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env
    )


def kill_and_wait(procs) -> None:
    """SIGKILL psutil processes (one already gone is fine) and wait for them, up to 30 s."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for Serve, Ray heads), from outside the
    kernel's ephemeral range (raydpo.cluster.free_port)."""
    from raydpo.cluster import free_port as cluster_free_port

    return cluster_free_port()
