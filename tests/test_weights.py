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


def test_buckets_are_bounded_and_keep_every_tensor_once_in_order():
    from raydpo.weights import buckets

    items = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 20, 30, 200, 5, 5, 40])]  # float32: 4 bytes each
    parts = list(buckets(items, 100 * 4))
    assert [list(p) for p in parts] == [["t0", "t1", "t2"], ["t3"], ["t4", "t5", "t6"]]  # t3 alone: over the bound
    assert all(sum(v.numel() * 4 for v in p.values()) <= 400 for p in parts if len(p) > 1)
    assert list(buckets([], 100)) == []


def test_the_trainers_weight_buckets_are_views_under_the_engines_names():
    """The online trainer used to clone its whole state dict before putting it into the
    object store: two extra copies of the model at the peak. Its buckets are now views of
    the live parameters (put_weights copies one bucket at a time), under the names a saved
    folder uses (GPT-NeoX: embed_out)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from raydpo.train.learner import weight_buckets

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(cfg)
    live = model.state_dict()
    parts = list(weight_buckets(model, None, 8 << 10))
    assert len(parts) > 3
    got = {k: v for p in parts for k, v in p.items()}
    assert "embed_out.weight" in got and "lm_head.weight" not in got
    assert got["embed_out.weight"].data_ptr() == live["lm_head.weight"].data_ptr()  # a view, not a copy
    assert all(got[k].data_ptr() == live[k].data_ptr() for k in live if k != "lm_head.weight")


def test_a_lora_policys_weight_buckets_are_the_merged_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raydpo.train.learner import full_state_dict, weight_buckets

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # B starts at zero: make the merge change the weights
    merged = full_state_dict(model, None)
    got = {k: v for p in weight_buckets(model, None, 4 << 10) for k, v in p.items()}
    assert got.keys() == merged.keys() and not any("lora" in k for k in got)
    assert all(torch.equal(got[k], merged[k]) for k in got)
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base)  # merged, not the base


@pytest.mark.slow
def test_stored_weights_travel_in_buckets_and_are_checked_before_any_is_read(ray_local):
    """put_weights / stored_items: every tensor comes back equal, bfloat16 included (numpy has
    no bfloat16: a DeepSpeed bf16 trainer's `v.numpy()` raised), a tied head follows its
    embedding, and a bad update is refused from its manifest before any bucket is fetched."""
    from raydpo.errors import WeightsError
    from raydpo.weights import StoredWeights, buckets, checked_update, put_weights, stored_items

    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g),
             "model.norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
             "model.layers.0.mlp.up_proj.weight": torch.randn(32, 8, generator=g)}
    stored = put_weights(buckets(state.items(), 600))  # 512 + 16 bytes, then 1024 alone
    assert len(stored.parts) == 2 and stored.shapes == {k: tuple(v.shape) for k, v in state.items()}
    back = dict(stored_items(stored))
    assert back.keys() == state.keys() and back["model.norm.weight"].dtype == torch.bfloat16
    assert all(torch.equal(back[k], state[k]) for k in state)

    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    expected = {k: tuple(v.shape) for k, v in state.items()}
    names = [k for k, _ in checked_update(expected, tied, stored)]
    assert names == ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                     "model.layers.0.mlp.up_proj.weight"]
    assert [k for k, _ in checked_update(expected, tied, stored, skip={"lm_head.weight"})] == list(state)
    unreadable = StoredWeights({**stored.shapes, "model.norm.weight": (9,)}, ("not an ObjectRef",))
    with pytest.raises(WeightsError, match="shape mismatch"):
        checked_update(expected, tied, unreadable)


_ZERO3 = """
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from transformers import AutoModelForCausalLM, LlamaConfig
from raydpo.train.learner import full_state_dict, weight_buckets
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg)
plain = {k: v.clone() for k, v in model.state_dict().items()}
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, dist_init_required=False, config={
    "train_batch_size": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True})
module = engine.module
assert all(p.numel() == 0 or hasattr(p, "ds_id") for p in module.parameters())
parts = []
for part in weight_buckets(module, 3, 8 << 10):
    parts.append({k: v.clone() for k, v in part.items()})  # inside its gather, as put_weights copies it
got = {k: v for p in parts for k, v in p.items()}
assert len(parts) > 3, len(parts)
assert got.keys() == plain.keys(), sorted(set(got) ^ set(plain))
bad = [k for k in plain if not torch.equal(got[k], plain[k])]
assert not bad, bad
assert all(p.numel() == 0 for p in module.parameters()), "parameters left gathered"
full = full_state_dict(module, 3)
assert all(torch.equal(full[k], plain[k]) for k in plain)
print("ZERO3 OK", len(parts))
"""


@pytest.mark.slow
def test_a_zero3_trainer_gathers_its_weights_one_bucket_at_a_time():
    """Under ZeRO-3 every rank holds a shard: the trainer used to gather the whole model, then
    clone it. It now gathers a bucket, hands it over and releases it: the buckets are the
    full weights, and no parameter is left gathered."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers.proc import free_port

    out = subprocess.run([sys.executable, "-c", _ZERO3, str(free_port())], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and "ZERO3 OK" in out.stdout, out.stdout[-1500:] + out.stderr[-3000:]


@pytest.mark.slow
def test_the_nccl_senders_source_declares_exactly_what_it_sends():
    """sampler.weight_transport=nccl cannot run here (no GPU). What can: vLLM's NCCL engine
    sizes its receive buffers from `metadata()` and then reads the bytes `__iter__` yields,
    so the two must agree element for element, and must be what the object-store route
    sends (the engines' names, GPT-NeoX's embed_out included)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from raydpo.train.learner import weight_buckets
    from raydpo.train.nccl_sync import policy_source

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(cfg)
    learner = SimpleNamespace(unwrapped=model, weight_buckets=lambda b: weight_buckets(model, None, b))
    source = policy_source(learner, 8 << 10)
    meta = source.metadata()
    sent = list(source)
    assert [(m.name, m.dtype, m.shape) for m in meta] == [(k, v.dtype, tuple(v.shape)) for k, v in sent]
    assert [k for k, _ in sent] == [k for p in weight_buckets(model, None, 1 << 30) for k in p]
    assert "embed_out.weight" in dict(sent)
