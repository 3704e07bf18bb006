"""Training as one Ray Train run per stage (SFT, offline DPO, a reward model): `fit`, the
per-worker loop it runs, and the SFT stage both the SFT job and the online loop use.

Data order is deterministic and the same on every worker: each worker reads
the whole (materialized) dataset in order, cuts it into *global* batches of
``batch_size`` pairs (sorted by length inside windows of ``bucket_window``
batches), and takes its rank's slice, split into micro-batches. Hence

* 2 workers x micro-batch b and 1 worker x micro-batch 2b see the same global
  batches and give the same loss and gradient-norm trajectory;
* the data position on resume is just the number of optimizer steps done.

The price is that every worker reads every tokenized row (cheap next to a
forward/backward pass); the global batch is what is split, not the dataset.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from raydpo import console
from raydpo.data.collate import bucket_by_length, pair_length
from raydpo.errors import DataError, TrainerError
from raydpo.files import atomic_write
from raydpo.train.checkpoints import latest_checkpoint, resume_directory
from raydpo.train.learner import Learner
from raydpo.train.metrics import MetricsLog
from raydpo.train.ray_train import build_trainer
from raydpo.train.spec import TrainSpec, make_spec


def global_batches(rows_iter, batch_size: int, seed: int, drop_last: bool = True, length=pair_length):
    """Global batches of `batch_size` rows, sorted by `length` (that of the layout they will
    be collated in) inside each window of `rows_iter`; by default the short tail is dropped
    so every step has the same pairs count."""
    return bucket_by_length(rows_iter, batch_size, seed=seed, drop_last=drop_last, length=length)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` is `TrainSpec.to_dict()` plus `total_rows`."""
    import ray.train

    from raydpo.cluster import pin_cpus

    spec = TrainSpec.from_dict(config["spec"])
    pin_cpus(config.get("cpu_ids"), "trainer")
    # Measured: inside a Ray worker given 2 CPUs, OMP_NUM_THREADS is 2 but torch
    # still runs 1 thread; use every CPU this worker reserved.
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    torch.manual_seed(spec.seed)
    steps_per_epoch = config["total_rows"] // spec.batch_size
    total_steps = steps_per_epoch * spec.epochs
    if spec.max_steps:
        total_steps = min(total_steps, spec.max_steps)
    if total_steps == 0:
        raise DataError(f"{config['total_rows']} training rows make no full global batch of {spec.batch_size}")

    with resume_directory(spec) as resume_dir:
        trainer = Learner(spec, config, total_steps, resume_dir)
    step = trainer.state.get("step", 0)
    log = MetricsLog(spec.run_dir, total_steps, step, spec.metrics_prefix) if trainer.rank == 0 else None
    shard = ray.train.get_dataset_shard("train")

    def save_checkpoint(final: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            trainer.save(Path(tmp), {"step": step, "steps_per_epoch": steps_per_epoch, "mode": spec.mode,
                                     "final": final})
            ckpt = ray.train.Checkpoint.from_directory(tmp) if trainer.writes_checkpoint else None
            ray.train.report({"step": step}, checkpoint=ckpt, checkpoint_dir_name=f"{spec.mode}-step-{step:06d}")

    t_last = time.perf_counter()
    done = False
    for epoch in range(step // steps_per_epoch, spec.epochs):
        windows = shard.iter_batches(batch_size=spec.batch_size * spec.bucket_window, batch_format="numpy",
                                     prefetch_batches=2)
        for i, gbatch in enumerate(global_batches(windows, spec.batch_size, spec.seed + epoch,
                                                  length=trainer.layout.length)):
            if epoch * steps_per_epoch + i < step:
                continue  # resume: skip what the checkpoint already trained on
            metrics = trainer.step(gbatch)
            step += 1
            now = time.perf_counter()
            metrics["tokens_per_s"] = metrics["tokens"] / (now - t_last)
            t_last = now
            if log:
                log.log(step, metrics)
            if spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(final=False)
            if step >= total_steps:
                done = True
                break
        if done:
            break
    if log:
        log.close()
    save_checkpoint(final=True)


def fit(spec: TrainSpec, train_ds, cfg, name: str, pad_id: int,
        precomputed_reference: bool = False, resume: bool = True) -> Path:
    """Run one training stage on Ray Train; return the final HF checkpoint folder.

    With `resume`, a finished stage of the same `name` is returned as is, and an
    unfinished one (or one asked for more `max_steps` than it ran) continues from
    its latest checkpoint: weights, optimizer, scheduler and data position.
    Ray Train V2 also keeps its own snapshot of the run under the same name; the
    worker prefers `ray.train.get_checkpoint()`, which points at the same place.
    """
    storage = Path(spec.run_dir, "ray_train").resolve()
    found = latest_checkpoint(storage, name) if resume else None
    if finished(found, spec, name):
        return found[0]
    if found:
        console.log("raydpo", f"{name}: resuming from step {found[1]['step']} ({found[0]})")
        spec = TrainSpec(**{**spec.__dict__, "resume_from": str(found[0])})
    rows = train_ds.count()
    if rows < spec.batch_size:  # here, not in the workers: their error would reach the user as Ray's traceback
        raise DataError(f"stage {name}: {rows} training rows make no full global batch of {spec.batch_size} "
                        f"(trainer.batch_size / trainer.sft_batch_size); give more data or a smaller batch")
    trainer = build_trainer(train_loop_per_worker, {"spec": spec.to_dict(), "total_rows": rows, "pad_id": pad_id,
                                                    "precomputed_reference": precomputed_reference},
                            cfg, name, storage, keep=2, datasets={"train": train_ds})
    total = min(rows // spec.batch_size * spec.epochs, spec.max_steps or 1 << 62)
    with follow_steps(Path(spec.run_dir) / "metrics.jsonl", spec.metrics_prefix, total,
                      found[1]["step"] if found else 0):
        trainer.fit()
    found = latest_checkpoint(storage, name)
    if not found or not found[1].get("final"):
        raise TrainerError(f"training stage {name} ended without a final checkpoint under {storage / name}")
    return found[0]


def finished(found: tuple[Path, dict] | None, spec: TrainSpec, name: str) -> bool:
    """Whether `found` (latest_checkpoint's answer) is a final checkpoint of stage `name` that
    ran all of spec.max_steps (0: no cap); says so on the console when it is."""
    done = bool(found and found[1].get("final") and (not spec.max_steps or found[1]["step"] >= spec.max_steps))
    if done:
        console.log("raydpo", f"{name}: already finished at step {found[1]['step']}; using {found[0]}")
    return done


@contextmanager
def follow_steps(metrics: Path, prefix: str, total: int, initial: int):
    """A progress bar on the driver's console that follows rank 0's steps in metrics.jsonl
    (worker output reaches the console only with --verbose)."""
    bar = None if console.verbose() else console.progress(total, prefix.rstrip("/"), initial)
    if bar is None or bar.disable:  # the workers' own bars are shown, or there is no terminal
        yield
        if bar is not None:
            bar.close()
        return
    stop, start = threading.Event(), metrics.stat().st_size if metrics.exists() else 0

    def follow():
        with contextlib.suppress(FileNotFoundError):
            while not metrics.exists() and not stop.wait(1.0):
                pass
            with open(metrics) as f:
                f.seek(start)  # only the lines this fit writes, read as they come
                while not stop.wait(1.0):
                    new = sum(1 for line in f.readlines() if f'"{prefix}loss"' in line)
                    bar.update(min(new, total - bar.n))

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        bar.close()


# The style task's demonstrations for the SFT stage when data.train_path is not given
# (mixed quality: the policy starts imperfect, so DPO has something to fix): as many as
# the stage trains on (sft_steps x sft_batch_size), at most this many, repeated in epochs.
STYLE_DEMONSTRATIONS = 20_000


def sft_demonstrations(cfg, run_dir: Path) -> str:
    """data.train_path, or the style task's demonstrations written (once, atomically) into run_dir."""
    if cfg.data.train_path is not None:
        return cfg.data.train_path
    from raydpo.tasks import style

    path = Path(run_dir) / "sft_demonstrations.jsonl"
    if not path.exists():
        count = min(STYLE_DEMONSTRATIONS, cfg.trainer.sft_steps * cfg.trainer.sft_batch_size)
        atomic_write(path, (json.dumps(r) + "\n" for r in style.sft_records(count, cfg.seed)))
    return str(path)


def sft_stage(cfg, base: Path, run_dir: Path, pad_id: int) -> Path:
    """The SFT stage: Ray Train on demonstrations (`sft_demonstrations`), validated and
    tokenized on Ray Data; resumable, and a finished stage is returned without reading its
    data again. The online loop starts from (and anchors to) its output."""
    from raydpo.data.pipeline import read_tokenized

    spec = make_spec(cfg, "sft", str(base), str(run_dir))
    found = latest_checkpoint(Path(spec.run_dir, "ray_train").resolve(), "sft")
    if finished(found, spec, "sft"):
        return found[0]
    ds = read_tokenized(cfg, sft_demonstrations(cfg, run_dir), base)
    return fit(spec, ds, cfg, "sft", pad_id)
