"""LoRA resume: a checkpoint's adapters come back (peft saves them without the adapter name)."""

import pytest
import torch
from safetensors.torch import save_file


def _lora_model(seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)  # the same base every time
    base = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2))
    torch.manual_seed(seed)  # different fresh adapters
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():  # lora_B starts at zero: give the "trained" adapters non-zero values
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    return model


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_resumed_lora_has_the_saved_adapters(tmp_path):
    from peft import get_peft_model_state_dict

    from raydpo.train.learner import restore_weights

    trained = _lora_model(seed=1)
    saved = get_peft_model_state_dict(trained)
    assert not any(".default." in k for k in saved)  # the file's keys lack the adapter name
    save_file({k: v.contiguous() for k, v in saved.items()}, str(tmp_path / "adapter.safetensors"))
    fresh = _lora_model(seed=2)
    assert any(not torch.equal(a, b) for a, b in zip(_adapters(fresh).values(), _adapters(trained).values()))
    restore_weights(fresh, tmp_path, lora=True)
    want, got = _adapters(trained), _adapters(fresh)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_an_adapter_file_that_matches_nothing_is_an_error(tmp_path):
    from raydpo.train.learner import restore_weights

    save_file({"base_model.model.nowhere.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="adapter"):
        restore_weights(_lora_model(seed=1), tmp_path, lora=True)


def test_lora_reference_runs_without_dropout_while_the_policy_trains():
    """GPT-2 has dropout 0.1: a reference forward in the policy's train mode would be random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    from raydpo.train.learner import _LoraReference

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = base.eval()(input_ids=ids).logits
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    model.train()
    reference = _LoraReference(model)
    with torch.no_grad():
        a, b = reference(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.equal(a, b) and torch.allclose(a, want, atol=1e-6)
    assert model.training  # the policy stays in train mode


def test_dpo_policies_train_without_dropout():
    from transformers import AutoModelForCausalLM, GPT2Config

    from raydpo.train.learner import disable_dropout

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    assert any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    disable_dropout(model)
    model.train()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
