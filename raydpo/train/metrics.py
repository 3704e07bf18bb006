"""Rank 0's per-step metrics: <run_dir>/metrics.jsonl, TensorBoard, and a progress bar."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Rank 0's per-step metrics: JSONL, TensorBoard, and a tqdm bar."""

    def __init__(self, run_dir: str, total: int, initial: int, prefix: str):
        from tqdm import tqdm

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # tensorboardX comes with ray[train]; stay usable without it
            self.tb = None
        self.prefix = prefix
        self.bar = tqdm(total=total, initial=initial, desc=prefix.rstrip("/") or "train", mininterval=2.0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **{self.prefix + k: v for k, v in metrics.items()}}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(self.prefix + k, v, step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if self.tb:
            self.tb.close()
