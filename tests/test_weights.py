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


def test_update_without_the_tied_head_fits_an_engine_started_with_it(tmp_path):
    """An engine started from a folder that stores the tied head (raydpo's checkpoints do)
    takes an update saved by `save_pretrained`, which leaves the head out: the head is put
    back from the embedding. It used to be refused as 'missing lm_head.weight'."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raydpo.errors import WeightsError
    from raydpo.weights import checked_update, checkpoint_shapes, engine_tied_keys

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    engine_dir, update_dir = tmp_path / "engine", tmp_path / "update"
    model.save_pretrained(engine_dir)
    full = with_tied_head(load_file(str(engine_dir / "model.safetensors")), tied_weight_keys(model))
    save_file({k: v.clone() for k, v in full.items()}, str(engine_dir / "model.safetensors"))  # head stored
    expected = checkpoint_shapes(engine_dir)
    assert "lm_head.weight" in expected
    tied = engine_tied_keys(engine_dir)

    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    model.save_pretrained(update_dir)  # head left out
    items = dict(checked_update(expected, tied, path=str(update_dir)))
    assert "lm_head.weight" not in load_file(str(update_dir / "model.safetensors"))
    assert torch.equal(items["lm_head.weight"], model.model.embed_tokens.weight)  # the new head, not the old one
    assert set(items) == set(expected)

    state = dict(items)
    del state["model.embed_tokens.weight"], state["lm_head.weight"]  # neither the head nor its source: refused
    with pytest.raises(WeightsError, match="missing .*model.embed_tokens.weight"):
        checked_update(expected, tied, state=state)


def test_shipped_weights_use_the_checkpoint_names_the_engine_expects(tmp_path):
    """transformers 5 loads GPT-NeoX's `embed_out` as `lm_head` and saves it back as
    `embed_out`: an engine started from the folder expects the saved name, so the trainer's
    in-memory state dict is renamed before it ships (it was refused as 'missing embed_out')."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from raydpo.errors import WeightsError
    from raydpo.weights import checked_update, checkpoint_shapes, checkpoint_state, engine_tied_keys

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    expected = checkpoint_shapes(tmp_path)
    tied = engine_tied_keys(tmp_path)
    in_memory = model.state_dict()
    assert "lm_head.weight" in in_memory and "embed_out.weight" in expected
    with pytest.raises(WeightsError, match="missing .*embed_out.weight"):
        checked_update(expected, tied, state=dict(in_memory))
    shipped = checkpoint_state(model, dict(in_memory))
    assert shipped["embed_out.weight"] is in_memory["lm_head.weight"]  # renamed, not copied
    assert dict(checked_update(expected, tied, state=shipped)).keys() == expected.keys()


def test_a_tied_head_the_engine_lacks_is_never_sent():
    """vLLM's Gemma 2 has no lm_head module (logits come from the embedding): a head in the
    update, or put back from the embedding, would fail the load part-way."""
    from raydpo.weights import checked_update

    expected = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,)}
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    state = {"model.embed_tokens.weight": torch.ones(8, 4), "model.norm.weight": torch.ones(4)}
    assert "lm_head.weight" in dict(checked_update(expected, tied, state=state))  # the engine has one: sent
    skip = {"lm_head.weight"}
    assert dict(checked_update(expected, tied, state=state, skip=skip)).keys() == expected.keys()
    with_head = {**state, "lm_head.weight": torch.ones(8, 4)}
    assert dict(checked_update(expected, tied, state=with_head, skip=skip)).keys() == expected.keys()


def test_restoring_a_saved_gpt_neox_uses_its_in_memory_names(tmp_path):
    """A checkpoint folder has the names save_pretrained writes (GPT-NeoX: embed_out); restoring
    it into a freshly built policy (--resume, a Ray Train restart) used to fail with
    'Missing key(s) lm_head.weight. Unexpected key(s) embed_out.weight'."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from raydpo.train.learner import restore_weights

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(cfg)
    saved.save_pretrained(tmp_path)
    assert "embed_out.weight" in load_file(str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    fresh = AutoModelForCausalLM.from_config(cfg)
    restore_weights(fresh, tmp_path, lora=False)
    for (k, a), b in zip(saved.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_lora_runs_adapter_file_is_not_read_as_model_weights(tmp_path):
    """raydpo's LoRA checkpoints keep adapter.safetensors beside the merged model: publishing or
    starting from that folder must not take the adapter's keys for model weights (it was refused
    as 'unknown ...lora_A.weight')."""
    from safetensors.torch import save_file

    from raydpo.weights import checkpoint_shapes, read_safetensors

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    save_file({"base_model.model.w.lora_A.weight": torch.ones(1, 2)}, str(tmp_path / "adapter.safetensors"))
    assert set(read_safetensors(tmp_path)) == {"w"}
    assert set(checkpoint_shapes(tmp_path)) == {"w"}
