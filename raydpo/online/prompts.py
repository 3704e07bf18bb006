"""The prompts the loop samples from and evaluates on."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from raydpo import console
from raydpo.config import RunConfig
from raydpo.errors import ConfigError, DataError
from raydpo.files import atomic_write


class PromptSource:
    """Prompts (a 'prompt' column, JSONL or Parquet) read and checked, shuffled once under
    the seed; iteration i takes the next window of n prompts, wrapping around (a new epoch
    over the prompts) when they run out.

    The order is numpy's permutation under the seed, computed on the driver. It used to be
    Ray Data's `random_shuffle(seed)`, which is much slower for a few hundred prompts (one
    map and one reduce task per block) and whose order depends on
    how the data is cut into blocks, which Ray picks from the data source and the cluster's
    CPUs: the same seed gave other windows on another cluster size."""

    def __init__(self, path: str | Path, seed: int):
        import numpy as np

        from raydpo.data.formats import read_prompts

        self.path = str(path)
        prompts, self.report = read_prompts(self.path)  # bad records named by file and line, and counted
        self.bad = sum(self.report.bad.values())
        if not prompts:
            first = f"; first: {self.report.examples[0]}" if self.report.examples else ""
            raise DataError(f"{path}: no usable prompts ({self.bad} bad records{first})")
        order = np.random.default_rng(seed).permutation(len(prompts))
        self._all = [prompts[i] for i in order]
        self.size = len(prompts)

    def window(self, iteration: int, n: int) -> list[str]:
        start = ((iteration - 1) * n) % self.size
        return [self._all[(start + j) % self.size] for j in range(n)]  # wraps: both ends

    def all(self) -> list[str]:
        return list(self._all)


def write_prompts(path: Path, prompts: Sequence[str]) -> Path:
    return atomic_write(path, (json.dumps({"prompt": p}) + "\n" for p in prompts))


def task_prompts(cfg: RunConfig, run_dir: Path) -> tuple[str, str]:
    """Training and eval prompt files: the configured ones, or the style task's."""
    from raydpo.tasks import style

    train, held_out = style.split_prompts(cfg.seed)
    tp = cfg.loop.prompts_path or str(write_prompts(run_dir / "prompts" / "train.jsonl", train))
    ep = cfg.loop.eval_prompts_path or str(write_prompts(run_dir / "prompts" / "eval.jsonl", held_out))
    for key, p in (("loop.prompts_path", tp), ("loop.eval_prompts_path", ep)):
        if not Path(p).exists():
            raise ConfigError(f"{key}: {p} does not exist")
    return tp, ep


def warn_overlap(eval_prompts: list[str], train_prompts: list[str]) -> int:
    """How many eval prompts are also training prompts; warns if any are."""
    overlap = len(set(eval_prompts) & set(train_prompts))
    if overlap:
        console.log("online", f"WARNING: {overlap} of the {len(eval_prompts)} eval prompts are also training prompts: the win rate "
            f"then partly measures memorisation; use eval prompts disjoint from loop.prompts_path")
    return overlap

