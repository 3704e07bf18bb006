"""One typed config tree for every raydpo job.

The tree is a set of pydantic models: pydantic (already a dependency of Ray
Serve and vLLM) gives us type checking, forbidden extra keys and error
locations. What it does not give, `raydpo.config_io` adds:

* YAML loading with the YAML error's line and column,
* dotted command-line overrides (``trainer.lr=1e-5``),
* a "did you mean ..." suggestion for unknown keys,
* one ``ConfigError`` that names every bad key with its source,
* for a renamed key, an error that names its new name (`RENAMED`).

Every field carries a one-line ``description``; ``raydpo config show`` prints
the resolved tree, and every run saves it as ``<run_dir>/config.yaml``.
Resource shapes (workers, CPUs, GPUs, replicas) live under ``cluster`` and
nowhere in algorithm code.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from raydpo.errors import ConfigError  # noqa: F401  (raised by raydpo.config_io; importers take it from here)
from raydpo.presets import PRESETS

# Keys that were renamed: the old name fails with an error naming the new one (a saved
# config.yaml of an older run is read with the new names, see read_saved_config).
RENAMED = {"trainer.reference": "trainer.reference_logps", "loop.reference": "loop.reference_policy"}


def _registered(name: str, registry: dict, what: str) -> str:
    """`name` if it is a key of `registry` (LOSSES, judge KINDS), else the error listing the keys."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(registry)}")
    return name


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored.
    # validate_assignment: code that sets a field later is type-checked too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """Shape of the tiny Llama the demo and tests build from scratch."""

    vocab_size: int = Field(720, ge=64, description="target BPE vocabulary size, special tokens included")
    hidden_size: int = Field(128, ge=8, description="model width")
    intermediate_size: int = Field(256, ge=8, description="MLP width")
    num_hidden_layers: int = Field(2, ge=1, description="decoder layers")
    num_attention_heads: int = Field(4, ge=1, description="query heads; hidden/heads must be a head size vLLM CPU supports (32, 64, ...)")
    num_key_value_heads: int = Field(4, ge=1, description="KV heads (fewer than query heads gives GQA)")
    max_position_embeddings: int = Field(256, ge=16, description="longest sequence the model accepts")
    tie_word_embeddings: bool = Field(True, description="share input embedding and LM head")
    initializer_range: float = Field(0.02, gt=0.0, description="std of the random initial weights")


class ModelConfig(_Section):
    path: str | None = Field(None, description="HF model folder (safetensors); None builds the tiny model into <run_dir>/base_model")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="compute dtype; bfloat16 only pays off on GPU")
    trust_remote_code: bool = Field(False, description="allow model code from the model folder; off by default for safety")
    preset: Literal["tiny", "small", "medium"] = Field("tiny", description="shape of the model built when path is None: tiny ~0.4M parameters (the demo), small ~26M, medium ~100M; model.tiny.* keys given explicitly win")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="shape used when path is None (model.preset fills it)")

    @model_validator(mode="before")
    @classmethod
    def _preset_shape(cls, data: Any) -> Any:
        preset = data.get("preset") if isinstance(data, dict) else None
        if isinstance(preset, str) and preset in PRESETS:  # anything else: the type check names it
            given = data.get("tiny")
            given = given.model_dump(exclude_unset=True) if isinstance(given, BaseModel) else given
            if given is None or isinstance(given, dict):
                data = {**data, "tiny": {**PRESETS[preset], **(given or {})}}
        return data


class DataConfig(_Section):
    train_path: str | None = Field(None, description="JSONL/Parquet file or folder of preference pairs")
    eval_path: str | None = Field(None, description="held-out pairs or prompts")
    format: Literal["auto", "standard", "conversational", "openai", "implicit", "sft"] = Field("auto", description="record format; auto detects it per record")
    max_prompt_length: int = Field(128, ge=1, description="prompt tokens kept (the end of the prompt is kept)")
    max_length: int = Field(192, ge=2, description="prompt + response tokens kept (the response is cut)")
    strict: bool = Field(False, description="fail on the first bad record instead of skipping and counting it")

    @model_validator(mode="after")
    def _prompt_fits(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        return self


class SamplerConfig(_Section):
    samples_per_prompt: int = Field(4, ge=1, description="responses drawn per prompt (k)")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(24, ge=1, description="response length cap in tokens")
    stop: list[str] = Field(default_factory=list, description="extra stop strings (EOS always stops)")
    seed: int | None = Field(None, description="sampling seed; None uses the run's seed. Each sample draws from a seed derived from (this, iteration, prompt position, sample index)")
    kv_cache_gib: float = Field(1.0, gt=0.0, description="KV cache per engine on CPU (VLLM_CPU_KVCACHE_SPACE)")
    max_model_len: int = Field(256, ge=16, description="vLLM context length")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (GPU only, not run here; must be 1 on CPU)")
    sync_timeout_s: float = Field(120.0, gt=0, description="seconds a weight sync may take before it fails")
    weight_transport: Literal["object_store", "nccl"] = Field("object_store", description="how new weights reach the engines: object_store (CPU or GPU, across nodes: buckets through Ray's object store) or nccl (GPU only and NEVER RUN here: vLLM's NCCL weight transfer, broadcast from trainer rank 0 into every engine; the policy endpoint reads the iteration's checkpoint)")
    sync_bucket_mb: int = Field(512, ge=1, description="weight sync through the object store goes in buckets of at most this many MB: a sender copies one bucket at a time (never a second whole model) and a ZeRO-3 trainer gathers one at a time")
    start_timeout_s: float = Field(300.0, gt=0, description="seconds an engine may take to start, or to be placed (a replacement waits for a node with its resources) before the run fails")
    request_timeout_s: float = Field(600.0, gt=0, description="seconds one sampling request may take before it fails")


class RemoteJudgeConfig(_Section):
    """judge.kind=openai: a judge model behind any OpenAI-compatible endpoint (`raydpo.judge.remote`)."""

    base_url: str | None = Field(None, description="the endpoint's base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:8001/v1")
    model: str | None = Field(None, description="the judge model's name at that endpoint")
    api: Literal["chat", "completions"] = Field("chat", description="POST /chat/completions (one user message) or /completions (the rendered template as the prompt)")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="NAME of the environment variable holding the API key (read on the judge replicas; the key itself is never logged or written); null: no key")
    mode: Literal["pairwise", "pointwise"] = Field("pairwise", description="pairwise: which of two is better, in both orders (judge.template); pointwise: a rubric score per response (judge.template with {prompt} and {response}, null: raydpo.judge.remote.DEFAULT_RUBRIC)")
    max_concurrency: int = Field(16, ge=1, description="requests in flight per judge replica")
    requests_per_minute: float = Field(0.0, ge=0.0, description="shared by every replica on this endpoint and model (0: no limit)")
    tokens_per_minute: float = Field(0.0, ge=0.0, description="prompt + completion tokens per minute, shared likewise (0: no limit)")
    timeout_s: float = Field(60.0, gt=0.0, description="per request; a timeout is retried")
    max_retries: int = Field(6, ge=0, description="retries of one request on 429, 5xx, timeouts and dropped connections (exponential backoff with jitter, or the server's Retry-After)")
    breaker_failures: int = Field(20, ge=1, description="failed attempts in a row, over at least breaker_after_s without a success, after which the run stops with an error (continue it with --resume)")
    breaker_after_s: float = Field(10.0, ge=0.0, description="see breaker_failures: with many requests in flight, a few quick failures in a row are not an outage")
    price_prompt_per_1k: float = Field(0.0, ge=0.0, description="price per 1k prompt tokens, for the cost column (0: not priced)")
    price_completion_per_1k: float = Field(0.0, ge=0.0, description="price per 1k completion tokens")
    cache: bool = Field(True, description="keep every answer in <run_dir>/judge_cache: a resumed run or a re-judged pair never pays twice")


class JudgeConfig(_Section):
    kind: str = Field("rule", description="how responses are judged: a key of raydpo.judge.kinds.KINDS (rule, reward_model, llm, openai)")
    rule: str = Field("raydpo.tasks.style:score", description="module:function scoring (prompt, response) -> float, for kind=rule")
    model_path: str | None = Field(None, description="reward model or LLM judge folder, for kind=reward_model/llm")
    tie_margin: float = Field(0.0, ge=0.0, description="score differences at or below this are ties")
    template: str | None = Field(None, description="kind=llm/openai: prompt with {prompt}, {response_a}, {response_b}; None uses raydpo.judge.rules.DEFAULT_TEMPLATE")
    answer_pattern: str = Field(r"\b([AB])\b", description="kind=llm/openai: regex whose first group (or match) is looked up in `answers`; openai pointwise: the score (the A/B default becomes raydpo.judge.remote.DEFAULT_SCORE_PATTERN)")
    answers: dict[str, Literal["a", "b"]] = Field(default_factory=lambda: {"A": "a", "B": "b"}, description="kind=llm: matched text -> side")
    max_new_tokens: int = Field(8, ge=1, description="kind=llm/openai: tokens the judge model may write")
    call_timeout_s: float = Field(3600.0, ge=0.0, description="seconds the loop waits for one call to the judge app (up to 256 items; in the overlapped loop queued behind the evaluation's) before it stops with an error: a stuck replica would otherwise hold the loop silently. 0: no limit (a slow LLM judge on CPU, a tightly rate-limited remote one). A resume may change it")
    remote: RemoteJudgeConfig = Field(default_factory=RemoteJudgeConfig, description="kind=openai: the endpoint, its limits and prices")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from raydpo.judge.kinds import KINDS

        return _registered(kind, KINDS, "judge kind")


class TrainerConfig(_Section):
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="data parallel strategy (gloo on CPU, NCCL on GPU)")
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage, for strategy=deepspeed")
    loss: str = Field("sigmoid", description="DPO loss variant: a key of raydpo.losses.LOSSES (sigmoid, robust, hinge, ipo, simpo)")
    beta: float = Field(0.1, gt=0.0, description="strength of the reference anchor (tau for IPO)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="assumed label noise: cDPO for sigmoid, robust DPO for robust")
    simpo_gamma_beta_ratio: float = Field(0.5, ge=0.0, description="SimPO target margin gamma / beta")
    rpo_alpha: float = Field(0.0, ge=0.0, description="weight of the chosen-response NLL term (RPO); 0 turns it off")
    reference_logps: Literal["live", "precomputed"] = Field("precomputed", description="the reference's log-probs: from a frozen model each step (live), or computed once (precomputed): offline by Ray Data and cached, in the online loop once per iteration on the trainer for all its passes")
    lr: float = Field(3e-4, gt=0.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up steps")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="LR after warm-up")
    batch_size: int = Field(16, ge=1, description="pairs per optimizer step, over all workers (global batch)")
    micro_batch_size: int = Field(16, ge=1, description="pairs per forward pass on one worker; accumulation = batch_size / (micro_batch_size * workers)")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    epochs: int = Field(1, ge=1, description="passes over the training pairs")
    max_steps: int = Field(0, ge=0, description="stop after this many optimizer steps (0: run all epochs)")
    bucket_window: int = Field(32, ge=1, description="global batches sorted by length together (1: no bucketing); transformers' group_by_length sorts 50 at a time")
    shared_prefix: bool = Field(True, description="DPO: run prompt + chosen + rejected as one row (prompt once) instead of two padded rows; same log-probs. Needs sdpa or eager attention")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    lora_r: int = Field(0, ge=0, description="LoRA rank via peft (0: full fine-tuning); the reference is the base with adapters off")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha")
    checkpoint_every: int = Field(0, ge=0, description="save a checkpoint every N optimizer steps (0: only at the end)")
    max_failures: int = Field(1, ge=0, description="worker failures Ray Train recovers from (restarting from the last checkpoint)")
    stall_timeout_s: float = Field(600.0, gt=0.0, description="online trainer: stop the loop with an error when no worker process has shown life (a heartbeat while running a command, a reply, asking for the next command) for this long; a Ray Train restart takes well under it")
    sft_steps: int = Field(1000, ge=0, description="SFT steps before DPO (0 skips the stage)")
    sft_lr: float = Field(2e-3, gt=0.0, description="SFT learning rate")
    sft_batch_size: int = Field(64, ge=1, description="SFT sequences per optimizer step (global)")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, loss: str) -> str:
        from raydpo.losses import LOSSES

        return _registered(loss, LOSSES, "loss")


class LoopConfig(_Section):
    iterations: int = Field(12, ge=1, description="online iterations")
    prompts_per_iteration: int = Field(64, ge=1, description="prompts sampled each iteration")
    dpo_passes: int = Field(4, ge=1, description="passes over each iteration's fresh pairs")
    eval_prompts: int = Field(256, ge=1, description="held-out prompts evaluated each iteration")
    reference_policy: Literal["fixed", "previous"] = Field("fixed", description="the policy DPO anchors to: the starting (SFT) policy, or last iteration's policy")
    prompts_path: str | None = Field(None, description="JSONL/Parquet with a 'prompt' column to sample from; None uses the built-in style task's training prompts")
    eval_prompts_path: str | None = Field(None, description="held-out prompts (same format); None uses the style task's held-out prompts")
    pairs: Literal["best_worst", "all"] = Field("best_worst", description="pairs per prompt: best vs worst sample, or every pair whose score gap exceeds pair_margin")
    pair_margin: float = Field(0.0, ge=0.0, description="minimum score gap for pairs='all' (ties at judge.tie_margin are always dropped)")
    replay_fraction: float = Field(0.0, ge=0.0, le=4.0, description="add this many earlier-iteration pairs per fresh pair to each iteration's training data")
    chunk_prompts: int = Field(32, ge=1, description="prompts per sampling chunk; each judged chunk is stored at once, so a crash loses at most the chunk in flight")
    eval_temperature: float = Field(0.8, ge=0.0, description="policy temperature for the win-rate evaluation")
    eval_baseline_samples: int = Field(4, ge=1, description="fixed starting-policy samples each eval response is compared with")
    pairs_from: Literal["current", "start"] = Field("current", description="sample pairs from the current policy (online DPO) or, all at once before iteration 1, from the starting policy (the offline baseline, same schedule)")
    rpo_alpha: float | None = Field(1.0, ge=0.0, description="online DPO adds rpo_alpha x the chosen responses' token-mean NLL to the DPO loss (RPO, Pang et al. 2024); overrides trainer.rpo_alpha in the loop, null: use trainer.rpo_alpha. Measured: plain DPO here lowers both responses' log-probs until the policy stops ending its replies (run-on text at the token cap); the NLL term on the chosen (EOS included) holds that off")
    truncated: Literal["keep", "drop"] = Field("keep", description="online pairs with a response cut at sampler.max_new_tokens: train on the cut ids as sampled (no EOS), or leave the pair out; counted either way. keep: a policy drifting into run-on replies is pulled back by exactly these pairs (measured: drop leaves it run-on)")
    max_pairs_per_iteration: int = Field(0, ge=0, description="train on at most this many of an iteration's pairs (0: all); every judged pair is still stored")
    serve_policy: bool = Field(True, description="serve the current policy on Ray Serve (OpenAI-compatible, /policy/v1) and publish each iteration's weights to it")
    eval_kl: bool = Field(True, description="estimate KL(policy || reference) each iteration from temperature-1 samples on the eval prompts")
    max_staleness: int = Field(0, ge=0, le=8, description="0: the synchronous loop (sample, judge, train, publish, evaluate, one after another). k >= 1: iteration i+1's pairs are sampled and judged while iteration i trains, from policy versions at most k behind the one they train (the samplers are never asked for older ones; a stored pair staler than k, e.g. after a resume with a smaller k, is counted as stale_dropped and not trained on), and evaluation runs beside training. Off-policy by up to k versions: see the README")


class Resources(_Section):
    count: int = Field(1, ge=0, description="how many of this role (workers, engines, replicas)")
    cpus: float = Field(1.0, ge=0.0, description="CPUs each one reserves")
    gpus: float = Field(0.0, ge=0.0, description="GPUs each one reserves (0 on CPU clusters)")
    max_count: int = Field(0, ge=0, description="Serve roles (judge, policy): autoscale between count and this many replicas when above count (0: fixed count)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each one reserves, which place it: e.g. {trainer_node: 1} puts it only on nodes started with `ray start --resources='{\"trainer_node\": N}'` (CPU and GPU go in cpus and gpus)")
    cpu_ids: list[int] | None = Field(None, description="trainer and sampler only: pin the role's processes to these CPU ids of their node (Linux sched_setaffinity), e.g. trainer [0] and sampler [1] to model separate pools on one machine; null: no pinning")

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        for key, amount in v.items():
            if key in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{key!r} is not a custom resource: use cpus/gpus for CPU and GPU")
            if amount <= 0:
                raise ValueError(f"{key}: {amount} must be > 0")
        return v

    def serve_scaling(self, target_ongoing_requests: int = 8) -> dict:
        """Serve deployment args: a fixed replica count, or an autoscaling config."""
        if self.max_count > self.count:
            return {"autoscaling": {"min_replicas": self.count, "max_replicas": self.max_count,
                                    "target_ongoing_requests": target_ongoing_requests}}
        return {"num_replicas": self.count}


class ClusterConfig(_Section):
    address: str | None = Field(None, description="Ray address to join; None joins RAY_ADDRESS or starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray; None: enough for the roles below, at least one per core")
    check_resources: bool = Field(True, description="at start, fail unless the cluster can hold every role that runs at once (false for an autoscaling cluster that will grow)")
    trainer: Resources = Field(default_factory=lambda: Resources(count=1, cpus=2), description="Ray Train workers (cpus = torch threads each)")
    sampler: Resources = Field(default_factory=lambda: Resources(count=1, cpus=1), description="vLLM sampler actors")
    judge: Resources = Field(default_factory=lambda: Resources(count=1, cpus=0.5), description="judge Serve replicas")
    policy: Resources = Field(default_factory=lambda: Resources(count=1, cpus=1), description="policy endpoint Serve replicas (one vLLM engine each), when loop.serve_policy")
    host: str = Field("127.0.0.1", description="address Serve HTTP binds to; loopback unless you mean to expose it")
    port: int = Field(8000, ge=1, le=65535, description="Serve HTTP port")

    @field_validator("trainer", "sampler", "judge", "policy", mode="before")
    @classmethod
    def _role_defaults(cls, v: Any, info: ValidationInfo) -> Any:
        """A role given in part keeps its own defaults (the trainer's 2 CPUs), not Resources'."""
        if isinstance(v, dict):
            return {**cls.model_fields[info.field_name].default_factory().model_dump(exclude_unset=True), **v}
        return v


class RunConfig(_Section):
    run_dir: str = Field("runs/demo", description="where every output of the run goes")
    seed: int = Field(0, description="global seed")
    model: ModelConfig = Field(default_factory=ModelConfig, description="policy model")
    data: DataConfig = Field(default_factory=DataConfig, description="preference data")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="vLLM sampling")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="judge")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="SFT and DPO training")
    loop: LoopConfig = Field(default_factory=LoopConfig, description="online loop")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray address and resource shapes")

    @model_validator(mode="after")
    def _batches_divide(self):
        workers = self.cluster.trainer.count
        if workers and self.trainer.batch_size % (self.trainer.micro_batch_size * workers):
            raise ValueError(
                f"trainer.batch_size ({self.trainer.batch_size}) must be a multiple of trainer.micro_batch_size "
                f"({self.trainer.micro_batch_size}) x cluster.trainer.count ({workers})")
        if self.sampler.tensor_parallel_size > 1 and self.cluster.sampler.gpus < self.sampler.tensor_parallel_size:
            raise ValueError(f"sampler.tensor_parallel_size ({self.sampler.tensor_parallel_size}) needs "
                             f"cluster.sampler.gpus >= it (got {self.cluster.sampler.gpus}); on CPU it must be 1")
        if self.loop.reference_policy == "previous" and self.trainer.lora_r:
            raise ValueError("loop.reference_policy='previous' cannot be used with trainer.lora_r > 0: the LoRA reference "
                             "is the base model with adapters off")
        if self.loop.max_staleness and self.loop.pairs_from == "start":
            raise ValueError("loop.max_staleness > 0 needs loop.pairs_from='current': the offline baseline's pairs all come "
                             "from the starting policy, so there is nothing to sample ahead")
        if self.loop.max_staleness and self.loop.reference_policy == "previous":
            raise ValueError("loop.max_staleness > 0 needs loop.reference_policy='fixed': with evaluation running beside "
                             "training, KL is taken against the frozen reference")
        if self.sampler.weight_transport == "nccl":
            if not (self.cluster.trainer.gpus and self.cluster.sampler.gpus):
                raise ValueError("sampler.weight_transport=nccl needs GPUs on both sides (cluster.trainer.gpus and "
                                 "cluster.sampler.gpus > 0): NCCL has no CPU backend; use object_store")
            if self.loop.max_staleness or self.trainer.lora_r:
                raise ValueError("sampler.weight_transport=nccl needs loop.max_staleness=0 (the broadcast lands while "
                                 "the trainer's command runs) and trainer.lora_r=0 (merged LoRA weights are not written)")
        for role in ("judge", "policy"):
            if getattr(self.cluster, role).cpu_ids is not None:
                raise ValueError(f"cluster.{role}.cpu_ids: only cluster.trainer and cluster.sampler are pinned to CPUs")
        for role in ("trainer", "sampler"):
            ids = getattr(self.cluster, role).cpu_ids
            if ids is not None and (not ids or min(ids) < 0 or len(set(ids)) != len(ids)):
                raise ValueError(f"cluster.{role}.cpu_ids must be distinct CPU ids >= 0 (got {ids})")
        if workers and self.trainer.sft_batch_size % workers:
            raise ValueError(f"trainer.sft_batch_size ({self.trainer.sft_batch_size}) must be a multiple of "
                             f"cluster.trainer.count ({workers})")
        return self
