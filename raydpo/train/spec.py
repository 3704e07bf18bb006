"""What a trainer worker is told to do (`TrainSpec`), built from the run's config (`make_spec`).
Crosses the driver -> worker boundary as a plain dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from raydpo.losses import LossSettings


@dataclass(frozen=True)
class TrainSpec:
    """Everything a worker needs; crosses the driver -> worker boundary."""

    mode: str  # "sft" | "dpo" | "reward" (the online trainer is "dpo" too)
    model_path: str
    run_dir: str  # metrics.jsonl and tensorboard/ go here (rank 0)
    loss: LossSettings = field(default_factory=LossSettings)
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    batch_size: int = 16
    micro_batch_size: int = 16
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int = 0
    bucket_window: int = 32
    shared_prefix: bool = False  # DPO modes only: `collate_shared_prefix` instead of `collate_pairs`
    seed: int = 0
    strategy: str = "ddp"
    zero_stage: int = 2
    lora_r: int = 0
    lora_alpha: int = 16
    gradient_checkpointing: bool = False
    bf16: bool = False
    checkpoint_every: int = 0
    resume_from: str | None = None
    trust_remote_code: bool = False
    metrics_prefix: str = ""  # e.g. "sft/" or "dpo/"
    weight_bucket_mb: int = 512  # the online trainer publishes its weights in buckets of this size
    reference_once: bool = False  # the online trainer scores an iteration's pairs with the reference once, not per pass
    engine_ranks: int = 1  # sampler.weight_transport=nccl: NCCL ranks per engine (its tensor_parallel_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainSpec:
        return cls(**{**d, "loss": LossSettings(**d["loss"])})


def make_spec(cfg, mode: str, model_path: str, run_dir: str, **overrides) -> TrainSpec:
    t = cfg.trainer
    common = dict(
        mode=mode, model_path=str(Path(model_path).resolve()), run_dir=str(Path(run_dir).resolve()),
        weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, schedule=t.schedule,
        max_grad_norm=t.max_grad_norm, bucket_window=t.bucket_window, shared_prefix=t.shared_prefix, seed=cfg.seed,
        strategy=t.strategy,
        zero_stage=t.zero_stage, lora_r=t.lora_r, lora_alpha=t.lora_alpha,
        gradient_checkpointing=t.gradient_checkpointing, bf16=cfg.model.dtype == "bfloat16",
        checkpoint_every=t.checkpoint_every, trust_remote_code=cfg.model.trust_remote_code,
        metrics_prefix=f"{mode}/", weight_bucket_mb=cfg.sampler.sync_bucket_mb,
        engine_ranks=cfg.sampler.tensor_parallel_size,
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

