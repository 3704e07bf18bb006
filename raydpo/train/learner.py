"""One trainer worker's state: the policy, its reference, the optimizer and the DDP or
DeepSpeed wrapper (`Learner`), and one optimizer step over a global batch. The
staged jobs (`raydpo.train.staged`) and the online trainer (`raydpo.train.online`)
both drive a `Learner`.

GPU notes (not run here: our machines have no GPU): ``use_gpu`` puts the model on
the worker's CUDA device, DDP uses NCCL (Ray Train picks it), and ``bf16`` wraps
forward passes in bf16 autocast on any device (`raydpo.train.step.precision`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

from raydpo.data.collate import layout
from raydpo.train.checkpoints import OPTIMIZER_FILE, STATE_FILE, write_manifest
from raydpo.train.spec import TrainSpec
from raydpo.train.step import batch_tokens, dpo_step_loss, precision, reward_step_loss, sft_loss
from raydpo.weights import buckets, checkpoint_names, memory_state, read_safetensors, tied_weight_keys, with_tied_head


def accumulation_steps(batch_size: int, micro_batch_size: int, world: int) -> int:
    per_step = micro_batch_size * world
    if batch_size % per_step:
        raise ValueError(
            f"trainer.batch_size ({batch_size}) must be a multiple of trainer.micro_batch_size "
            f"({micro_batch_size}) x workers ({world}) = {per_step}"
        )
    return batch_size // per_step


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return f


def _model_class(spec: TrainSpec):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if spec.mode == "reward" else AutoModelForCausalLM


def disable_dropout(model) -> None:
    """Set every dropout probability to 0, so policy and reference forwards agree at step 0."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _load_model(spec: TrainSpec, device: torch.device):
    kw = {}
    if spec.mode == "reward":  # a scalar head on the policy's body; its pad id finds each sequence's last token
        from transformers import AutoTokenizer

        kw = {"num_labels": 1, "pad_token_id": AutoTokenizer.from_pretrained(spec.model_path).pad_token_id}
    model = _model_class(spec).from_pretrained(spec.model_path, dtype=torch.float32,
                                               trust_remote_code=spec.trust_remote_code, **kw).to(device)
    if spec.mode == "dpo":
        disable_dropout(model)  # as TRL's DPO does by default: log-ratios against the reference stay exact
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model


def restore_weights(model, folder: str | Path, lora: bool) -> None:
    """Load a checkpoint's weights into the freshly built (unwrapped) policy.

    LoRA: the base is model_path, unchanged, so only the adapters are restored.
    `adapter.safetensors` holds peft's own keys, without the adapter name
    (``...lora_A.weight``, not ``...lora_A.default.weight``): a plain
    load_state_dict(strict=False) matches none of them and silently keeps the fresh
    adapters, so they go through peft's set_peft_model_state_dict, and any key it
    could not place is an error.
    """
    if not lora:
        # the folder has the names save_pretrained writes; the model may name some keys otherwise
        model.load_state_dict(with_tied_head(memory_state(model, read_safetensors(folder)), tied_weight_keys(model)))
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / "adapter.safetensors"
    saved = load_file(str(path))
    if not saved:
        raise ValueError(f"{path}: no adapter tensors")
    result = set_peft_model_state_dict(model, saved)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} adapter tensors match no adapter of the model, "
                         f"e.g. {unexpected[:3]}")
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if missing:
        raise ValueError(f"{path}: the model's adapters {missing[:3]} are not in the checkpoint")


class _LoraReference(torch.nn.Module):
    """The reference for LoRA: the same module with adapters disabled, so no
    second copy of the base weights is held."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **kw):
        # eval mode: the policy module is in train mode, and the reference must not drop out
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            with self.peft_model.disable_adapter():
                return self.peft_model(**kw)
        finally:
            self.peft_model.train(was_training)


def full_state_dict(module, zero_stage: int | None) -> dict[str, torch.Tensor]:
    """Plain HF state dict of the (unwrapped) policy: LoRA merged, ZeRO-3 gathered."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return _plain_state(module)
    return _plain_state(module)


def _plain_state(module) -> dict[str, torch.Tensor]:
    if hasattr(module, "merge_and_unload"):  # peft: merge a copy, keep training the adapters
        import copy

        module = copy.deepcopy(module).merge_and_unload()
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def weight_buckets(module, zero_stage: int | None, bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """The policy's state dict under the names a saved folder uses (the engines' names), in
    buckets of at most `bucket_bytes` for `raydpo.weights.put_weights`, without a copy of the
    whole model: views of the live parameters, each bucket copied out by the caller before it
    asks for the next. ZeRO-3 gathers one bucket's parameters at a time, so every rank must
    iterate (the gathers are collective). LoRA merges into a copy of the model first (the
    one whole copy; under ZeRO-3 inside one gather of everything, as `full_state_dict`)."""
    if hasattr(module, "merge_and_unload"):
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield from _merged_buckets(module, bucket_bytes)
        else:
            yield from _merged_buckets(module, bucket_bytes)
        return
    if zero_stage != 3:
        yield from _renamed_buckets(module, bucket_bytes)
        return
    import deepspeed

    names = checkpoint_names(module)
    for part in buckets(module.state_dict(keep_vars=True).items(), bucket_bytes, _full_nbytes):
        params = list({id(v): v for v in part.values() if hasattr(v, "ds_id")}.values())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield {names.get(k, k): v.detach() for k, v in part.items()}


def _full_nbytes(v: torch.Tensor) -> int:
    return getattr(v, "ds_numel", v.numel()) * v.element_size()  # a ZeRO-3 parameter's own numel is its shard's


def _merged_buckets(module, bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    import copy

    merged = copy.deepcopy(module).merge_and_unload()  # peft: merge a copy, keep training the adapters
    yield from _renamed_buckets(merged, bucket_bytes)


def _renamed_buckets(module, bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """`module`'s state dict (views) under the names a saved folder uses, in buckets."""
    names = checkpoint_names(module)
    yield from buckets(((names.get(k, k), v) for k, v in module.state_dict().items()), bucket_bytes)


def save_hf(module, zero_stage, spec: TrainSpec, out: Path, write: bool) -> None:
    """HF folder (safetensors + config + tokenizer) loadable by transformers and vLLM.
    Every rank must call it (ZeRO-3 gathers collectively); only `write` ranks write."""
    state = full_state_dict(module, zero_stage)
    if not write:
        return
    from transformers import AutoConfig, AutoTokenizer

    cfg = module.config if spec.mode == "reward" else AutoConfig.from_pretrained(spec.model_path,
                                                                                 trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        shell = _model_class(spec).from_config(cfg)
    shell.save_pretrained(out, state_dict=state, safe_serialization=True)
    AutoTokenizer.from_pretrained(spec.model_path, trust_remote_code=spec.trust_remote_code).save_pretrained(out)
    gen = Path(spec.model_path) / "generation_config.json"
    if gen.exists():
        (out / "generation_config.json").write_text(gen.read_text())


def warm_up_save() -> None:
    """Import now what a process's first HF save imports: transformers has accelerate unwrap the
    model, and accelerate imports DeepSpeed when it is installed (0.13-0.4 s measured on 2 cores;
    a DDP run imports it nowhere else). For a trainer whose first save is on the clock."""
    try:
        from accelerate.utils import extract_model_from_parallel
    except ImportError:  # transformers saves without it
        return
    extract_model_from_parallel(torch.nn.Linear(1, 1))


def _mean_across_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t)}


class Learner:
    """One worker's model, reference, optimizer and DDP/DeepSpeed wrapper, and the
    optimizer step over one global batch."""

    def __init__(self, spec: TrainSpec, config: dict, total_steps: int, resume_dir: str | None):
        import ray.train
        import ray.train.torch

        from raydpo.cluster import require_shared

        require_shared(spec.model_path, "trainer worker")
        ctx = ray.train.get_context()
        self.spec = spec
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        self.pad_id = config["pad_id"]
        self.layout = layout(spec.shared_prefix and spec.mode == "dpo")
        self.accum = accumulation_steps(spec.batch_size, spec.micro_batch_size, self.world)
        model = _load_model(spec, self.device)
        self.reference = None
        if spec.mode == "dpo" and spec.loss.needs_reference and not config.get("precomputed_reference"):
            if spec.lora_r:
                self.reference = _LoraReference(model)
            else:
                from transformers import AutoModelForCausalLM

                self.reference = AutoModelForCausalLM.from_pretrained(
                    config.get("reference_path") or spec.model_path, dtype=torch.float32,
                    trust_remote_code=spec.trust_remote_code).to(self.device).eval()
                self.reference.requires_grad_(False)

        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters (CPU and CUDA); faster per step on
        # the 26M bench model, the same update up to float rounding
        optimizer = torch.optim.AdamW(self.params, lr=spec.lr, weight_decay=spec.weight_decay,
                                      fused=self.device.type in ("cpu", "cuda"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.schedule, spec.warmup_steps, total_steps))

        self.state: dict = {}
        if resume_dir:
            self.state = json.loads((Path(resume_dir) / STATE_FILE).read_text())
            restore_weights(model, resume_dir, lora=bool(spec.lora_r))

        self.engine = None
        if spec.strategy == "deepspeed":
            import deepspeed

            ds_config = {
                "train_batch_size": spec.batch_size,
                "train_micro_batch_size_per_gpu": spec.micro_batch_size,
                "gradient_accumulation_steps": self.accum,
                "gradient_clipping": spec.max_grad_norm,
                "zero_optimization": {"stage": spec.zero_stage},
                "zero_allow_untested_optimizer": True,
                "bf16": {"enabled": spec.bf16},
                "steps_per_print": 1 << 30,
            }
            self.engine, optimizer, _, scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
            )
            self.policy, self.unwrapped = self.engine, self.engine.module
            if resume_dir and (Path(resume_dir) / "deepspeed").exists():
                self.engine.load_checkpoint(str(Path(resume_dir) / "deepspeed"), tag="state",
                                            load_module_strict=not spec.lora_r)
        else:
            self.policy = ray.train.torch.prepare_model(model)  # DDP when world > 1
            self.unwrapped = model
            if resume_dir and (Path(resume_dir) / OPTIMIZER_FILE).exists():
                saved = torch.load(Path(resume_dir) / OPTIMIZER_FILE, weights_only=True)  # our own file, tensors only
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
        self.optimizer, self.scheduler = optimizer, scheduler
        self.autocast = precision(spec.bf16, self.device.type)
        self.policy.train()

    def step(self, gbatch: dict) -> dict[str, float]:
        """One optimizer step on this rank's slice of the global batch; metrics averaged over ranks.

        A full global batch is `accum` micro-batches per rank. A short one (the
        tail of an online iteration's pairs; DDP only) is cut the same way, into
        fewer micro-batches, each weighted by its share of the rank's rows; the
        < world rows that do not split evenly over the ranks are left out.
        """
        spec, engine, world = self.spec, self.engine, self.world
        n = len(gbatch["prompt_ids"])
        if engine is not None and n != spec.batch_size:
            raise ValueError(f"DeepSpeed accumulates fixed micro-batches: a batch of {n} rows is not {spec.batch_size}")
        per_rank = n // world
        if per_rank == 0:
            raise ValueError(f"a batch of {n} rows cannot be split over {world} workers")
        starts = list(range(0, per_rank, spec.micro_batch_size))
        sums: dict[str, float] = {}
        tokens = padded = 0
        for m, start in enumerate(starts):
            lo = self.rank * per_rank + start
            rows = min(spec.micro_batch_size, per_rank - start)
            weight = rows / per_rank  # 1 / accum for a full batch
            mb = self.layout.collate({k: v[lo:lo + rows] for k, v in gbatch.items()}, self.pad_id)
            mb = {k: v.to(self.device) for k, v in mb.items()}
            tokens += batch_tokens(mb)
            padded += mb["input_ids"].numel()
            sync = m == len(starts) - 1
            ctx_sync = self.policy.no_sync() if (engine is None and world > 1 and not sync) else nullcontext()
            with ctx_sync, self.autocast:
                if spec.mode == "sft":
                    loss, metrics = sft_loss(self.policy, mb)
                elif spec.mode == "reward":
                    loss, metrics = reward_step_loss(self.policy, mb)
                else:
                    loss, metrics = dpo_step_loss(self.policy, self.reference, mb, spec.loss)
            if engine is not None:
                engine.backward(loss)  # DeepSpeed scales by 1/accum itself
                engine.step()
            else:
                (loss * weight).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
        if engine is not None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, spec.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        sums["tokens"], sums["tokens_padded"] = float(tokens), float(padded)
        metrics = _mean_across_ranks(sums, world)
        metrics["tokens"] *= world  # all workers' real tokens this step
        metrics["tokens_padded"] *= world  # ... and what the forward passes ran, padding included
        metrics["grad_norm"] = grad_norm  # already global: no averaging
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full HF state dict of the policy (every rank must call it: ZeRO-3 gathers)."""
        return full_state_dict(self.unwrapped, self.spec.zero_stage if self.engine else None)

    def weight_buckets(self, bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
        """`weight_buckets` of the policy (every rank must iterate: ZeRO-3 gathers)."""
        return weight_buckets(self.unwrapped, self.spec.zero_stage if self.engine else None, bucket_bytes)

    def save(self, out: Path, state: dict) -> None:
        """HF folder + trainer state + optimizer (or DeepSpeed shards) into `out`; every rank calls it."""
        spec, rank = self.spec, self.rank
        save_hf(self.unwrapped, spec.zero_stage if self.engine else None, spec, out, write=rank == 0)
        writers = list(range(self.world)) if self.engine is not None else [0]
        if rank == 0:
            (out / STATE_FILE).write_text(json.dumps({**state, "writers": writers}))
            if spec.lora_r:
                from peft import get_peft_model_state_dict
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(self.unwrapped).items()},
                          str(out / "adapter.safetensors"))
        if self.engine is not None:  # every rank writes its own ZeRO shard files
            self.engine.save_checkpoint(str(out / "deepspeed"), tag="state")
        elif rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       out / OPTIMIZER_FILE)
        if rank in writers:
            write_manifest(out, rank)  # last: the checkpoint is complete only with every writer's manifest

    @property
    def writes_checkpoint(self) -> bool:
        return self.rank == 0 or self.engine is not None

