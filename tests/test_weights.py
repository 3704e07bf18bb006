"""Tied heads: the key names come from the model, for any architecture."""

import pytest
import torch
from safetensors.torch import load_file

from raydpo.weights import tied_weight_keys, with_tied_head


def _saved_state(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)  # drops the tied copy of the head
    return load_file(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_head_restored_under_the_models_own_names(arch, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D layers; the head is tied to transformer.wte.weight
        cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    else:
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    state = _saved_state(model, tmp_path)
    tied = tied_weight_keys(model)
    assert len(tied) == 1
    ((head, embed),) = tied.items()
    assert head not in state and embed in state  # what a checkpoint on disk looks like
    full = with_tied_head(state, tied)
    assert torch.equal(full[head], full[embed])
    fresh = AutoModelForCausalLM.from_config(cfg)
    fresh.load_state_dict(full, strict=True)  # every key, under the names this architecture uses
    assert torch.equal(fresh.get_output_embeddings().weight, model.get_input_embeddings().weight)


def test_untied_and_reward_models_have_no_tied_keys():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, tie_word_embeddings=False, num_labels=1)
    assert tied_weight_keys(AutoModelForCausalLM.from_config(cfg)) == {}
    assert tied_weight_keys(AutoModelForSequenceClassification.from_config(cfg)) == {}
    state = {"a": torch.zeros(1)}
    assert with_tied_head(state, {}) == state
