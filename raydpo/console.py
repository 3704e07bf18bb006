"""What a job prints. By default: raydpo's own lines (one per phase or iteration), a
progress bar for long stages, and a short table at the end; Ray's, vLLM's and the
libraries' internal logging stays in the Ray session's log files. `--verbose` shows
everything, including every Ray worker's output."""

from __future__ import annotations

import logging
import os
import sys

_verbose = False


def setup(verbose: bool) -> None:
    """Call once, before Ray or the libraries are imported."""
    global _verbose
    _verbose = verbose
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed probes for accelerators in every process that imports it and warns when
        # it finds none; saying "cpu" up front skips the probe (local Ray processes inherit it)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def verbose() -> bool:
    return _verbose


def ray_init_options() -> dict:
    """ray.init arguments: worker output reaches this console only with --verbose (it is
    always in <Ray temp dir>/session_*/logs)."""
    return {"log_to_driver": _verbose, "logging_level": logging.INFO if _verbose else logging.ERROR}


def after_ray_init() -> None:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = _verbose and sys.stderr.isatty()
    quiet("ray.data", "ray.train")  # an execution plan per dataset, a line per worker group


def quiet(*loggers: str) -> None:
    """Without --verbose, these libraries' loggers (on this process) say only errors. Call it
    after importing a library that configures its own logger on import (ray.serve does)."""
    if not _verbose:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)


def log(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", flush=True)


def progress(total: int | None, desc: str, initial: int = 0):
    """A tqdm bar on this console (stderr), off when stderr is not a terminal and not verbose."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, mininterval=2.0,
                disable=not (sys.stderr.isatty() or _verbose))
