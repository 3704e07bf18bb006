"""The trainer role on the driver side: build the Ray Train `TorchTrainer`,
precompute reference log-probs with Ray Data, find checkpoints to resume from.
The per-worker loop is `raydpo.train.worker`; the math is `raydpo.train.step`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import ray
import ray.data
import torch

from raydpo.config import RunConfig
from raydpo.data.collate import layout
from raydpo.data.pipeline import ArrowTokenizer, ordered
from raydpo.train.step import LossSettings, precision, reference_logps
from raydpo.train.worker import STATE_FILE, TrainSpec, checkpoint_problem, train_loop_per_worker


def make_spec(cfg: RunConfig, mode: str, model_path: str, run_dir: str, **overrides) -> TrainSpec:
    t = cfg.trainer
    common = dict(
        mode=mode, model_path=str(Path(model_path).resolve()), run_dir=str(Path(run_dir).resolve()),
        weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, schedule=t.schedule,
        max_grad_norm=t.max_grad_norm, bucket_window=t.bucket_window, shared_prefix=t.shared_prefix, seed=cfg.seed,
        strategy=t.strategy,
        zero_stage=t.zero_stage, lora_r=t.lora_r, lora_alpha=t.lora_alpha,
        gradient_checkpointing=t.gradient_checkpointing, bf16=cfg.model.dtype == "bfloat16",
        checkpoint_every=t.checkpoint_every, trust_remote_code=cfg.model.trust_remote_code,
        metrics_prefix=f"{mode}/",
    )
    if mode == "sft":
        common.update(lr=t.sft_lr, batch_size=t.sft_batch_size, micro_batch_size=t.sft_batch_size // cfg.cluster.trainer.count,
                      max_steps=t.sft_steps, epochs=1 << 20)
    else:  # "dpo" and "reward" (a Bradley-Terry reward model on the same pairs)
        common.update(lr=t.lr, batch_size=t.batch_size, micro_batch_size=t.micro_batch_size, epochs=t.epochs,
                      max_steps=t.max_steps,
                      loss=LossSettings(t.loss, t.beta, t.label_smoothing, t.simpo_gamma_beta_ratio, t.rpo_alpha))
    common.update(overrides)
    return TrainSpec(**common)


def latest_checkpoint(storage: str | Path, name: str, pattern: str = "*-step-*",
                      key: str = "step") -> tuple[Path, dict] | None:
    """(path, trainer_state) of run `name`'s complete checkpoint (folders matching `pattern`)
    with the highest trainer_state[`key`], if any. An incomplete one (a kill during the
    copy into storage: see `checkpoint_problem`) is passed over, with a warning."""
    best = None
    for state_file in Path(storage, name).glob(f"{pattern}/{STATE_FILE}"):
        problem = checkpoint_problem(state_file.parent)
        if problem:
            print(f"[raydpo] skipping incomplete checkpoint {state_file.parent}: {problem}", file=sys.stderr)
            continue
        state = json.loads(state_file.read_text())
        if best is None or state[key] > best[1][key]:
            best = (state_file.parent, state)
    return best


def fit(spec: TrainSpec, train_ds: ray.data.Dataset, cfg: RunConfig, name: str, pad_id: int,
        precomputed_reference: bool = False, resume: bool = True) -> Path:
    """Run one training stage on Ray Train; return the final HF checkpoint folder.

    With `resume`, a finished stage of the same `name` is returned as is, and an
    unfinished one (or one asked for more `max_steps` than it ran) continues from
    its latest checkpoint: weights, optimizer, scheduler and data position.
    Ray Train V2 also keeps its own snapshot of the run under the same name; the
    worker prefers `ray.train.get_checkpoint()`, which points at the same place.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    storage = Path(spec.run_dir, "ray_train").resolve()
    found = latest_checkpoint(storage, name) if resume else None
    if found and found[1].get("final") and (not spec.max_steps or found[1]["step"] >= spec.max_steps):
        print(f"[raydpo] {name}: already finished at step {found[1]['step']}; using {found[0]}")
        return found[0]
    if found:
        print(f"[raydpo] {name}: resuming from step {found[1]['step']} ({found[0]})")
        spec = TrainSpec(**{**spec.__dict__, "resume_from": str(found[0])})
    res = cfg.cluster.trainer
    exec_opts = ray.data.ExecutionOptions(preserve_order=True)  # same row order on every worker, every run
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "total_rows": train_ds.count(), "pad_id": pad_id,
                           "precomputed_reference": precomputed_reference, "cpus_per_worker": res.cpus},
        scaling_config=ScalingConfig(num_workers=res.count, use_gpu=res.gpus > 0,
                                     resources_per_worker={"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}),
        run_config=TrainRunConfig(name=name, storage_path=str(storage),
                                  failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_ds},
        dataset_config=DataConfig(datasets_to_split=[], execution_options=exec_opts),
    )
    trainer.fit()
    found = latest_checkpoint(storage, name)
    if not found or not found[1].get("final"):
        raise RuntimeError(f"training stage {name} ended without a final checkpoint under {storage / name}")
    return found[0]


class _ReferenceScorer:
    """Ray Data callable class: the frozen reference model on a CPU worker."""

    def __init__(self, model_path: str, pad_id: int, trust_remote_code: bool, num_threads: int,
                 shared_prefix: bool, micro_batch_size: int, tokenize: tuple[int, int] | None = None,
                 bf16: bool = False):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(num_threads)  # Ray leaves torch at 1 thread even with more CPUs reserved
        torch.set_grad_enabled(False)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                          trust_remote_code=trust_remote_code).eval()
        self.pad_id = pad_id
        self.layout = layout(shared_prefix)
        self.micro_batch_size = micro_batch_size
        self.bf16 = bf16
        # text rows in: tokenized here first, with the same `ArrowTokenizer` as `tokenize()`
        self.tokenizer = ArrowTokenizer(model_path, *tokenize, trust_remote_code) if tokenize else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.tokenizer is not None:
            batch = self.tokenizer(batch)
        cols = {k: batch.column(k).to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        n = batch.num_rows
        # forward passes over rows of similar length (less padding), results put back in row order
        order = sorted(range(n), key=lambda i: self.layout.length(cols, i))
        chosen, rejected = [0.0] * n, [0.0] * n
        for s in range(0, n, self.micro_batch_size):
            idx = order[s:s + self.micro_batch_size]
            part = {k: [v[i] for i in idx] for k, v in cols.items()}
            with precision(self.bf16, "cpu"):  # the policy's precision: what the live reference would give
                rc, rr = reference_logps(self.model, self.layout.collate(part, self.pad_id))
            for i, c, r in zip(idx, rc.tolist(), rr.tolist()):
                chosen[i], rejected[i] = c, r
        return batch.append_column("reference_chosen_logps", pa.array(chosen, pa.float32())).append_column(
            "reference_rejected_logps", pa.array(rejected, pa.float32()))


def precompute_reference(ds: ray.data.Dataset, model_path: str, pad_id: int, concurrency: int = 1,
                         batch_size: int = 256, trust_remote_code: bool = False, cpus: float = 1,
                         shared_prefix: bool = True, micro_batch_size: int = 64,
                         tokenize: tuple[int, int] | None = None, bf16: bool = False) -> ray.data.Dataset:
    """Add reference_chosen_logps / reference_rejected_logps columns, computed once
    by Ray Data batch inference, so that training (and later epochs and runs, if
    the result is written next to the pairs) skips the reference forward.

    Each Ray Data batch of `batch_size` rows is sorted by length and run in forward
    passes of `micro_batch_size` pairs, in the shared-prefix layout unless told not to.
    No gradients are kept, so the forward batch can be larger than training's: bigger
    matmuls run closer to the machine's peak; the log-probs do not depend on it.

    `tokenize=(max_prompt_length, max_length)`: `ds` holds validated text rows
    (`read_pairs`), and the scorer tokenizes each batch itself, exactly as
    `raydpo.data.pipeline.tokenize` would (same `ArrowTokenizer`, the model's
    tokenizer), before scoring it. One Ray Data stage instead of two: no second
    execution, no materialized intermediate, and the scorer's start-up (imports,
    model load) is not paid after tokenization has finished. Measured on the
    bench's 1024 pairs on 2 cores: 20.9 s against 26.3 s for tokenize then score
    (`bench/reference_pass.py`, medians of alternated runs; same log-probs).
    """
    ordered()
    return ds.map_batches(_ReferenceScorer, fn_constructor_args=(model_path, pad_id, trust_remote_code, max(1, int(cpus)),
                                                                 shared_prefix, micro_batch_size, tokenize, bf16),
                          batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=cpus)
