"""The tiny model factory: deterministic, safetensors-only, loadable as is."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from raydpo.config import TinyModelConfig
from raydpo.tiny_model import EOS, PAD, build_tiny_model, count_parameters
from tests.helpers.proc import run_py


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deterministic_under_seed(tmp_path, style_corpus):
    a = build_tiny_model(style_corpus, tmp_path / "a", seed=7)
    b = build_tiny_model(style_corpus, tmp_path / "b", seed=7)
    c = build_tiny_model(style_corpus, tmp_path / "c", seed=8)
    assert digest(a / "tokenizer.json") == digest(b / "tokenizer.json")
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.layers.0.self_attn.q_proj.weight"], wc["model.layers.0.self_attn.q_proj.weight"])


def test_folder_loads_in_transformers_with_expected_shape(tmp_path, style_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = TinyModelConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96)
    out = build_tiny_model(style_corpus, tmp_path / "m", shape, seed=0)
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # no pickles
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (64, 2, 1, 2)
    assert cfg.vocab_size == len(tok) <= shape.vocab_size
    assert model.dtype == torch.float32
    assert tok.eos_token == EOS and tok.pad_token == PAD and tok.eos_token_id != tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    # hand count for tied embeddings: V*H + L*(4 attn-ish + 3 MLP + 2 norms) + final norm
    V, H, I, KV = cfg.vocab_size, 64, 96, 32
    per_layer = H * H + H * KV * 2 + H * H + 3 * H * I + 2 * H
    assert count_parameters(model) == V * H + 2 * per_layer + H


def test_tokenizer_round_trip_and_keyword_token(tmp_path, style_corpus):
    from transformers import AutoTokenizer

    out = build_tiny_model(style_corpus, tmp_path / "m", seed=0)
    tok = AutoTokenizer.from_pretrained(out)
    text = "about: salad | max 6\n salad please. ünïcödé 🙂"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text  # byte-level: anything round-trips, no BOS added
    # The keyword is the same token after "about:" in the prompt and at the start of the response.
    assert ids[2] == tok(" salad").input_ids[0] and tok(" salad").input_ids == [ids[2]]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_head_size_vllm_cpu_cannot_run_is_refused(style_corpus, tmp_path):
    with pytest.raises(ValueError, match="head size 16"):
        build_tiny_model(style_corpus, tmp_path / "m", TinyModelConfig(hidden_size=64, num_attention_heads=4))


def test_cli_builds_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\nthe cat sat on the mat\n" * 50)
    r = run_py(["-m", "raydpo.cli", "tiny-model", "--out", tmp_path / "m", "--corpus", corpus, "model.tiny.vocab_size=300"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model.safetensors").exists()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n\xff\xfe broken\n")
    r = run_py(["-m", "raydpo.cli", "tiny-model", "--out", tmp_path / "m2", "--corpus", bad], timeout=120)
    assert r.returncode == 2 and "bad.txt:2: not UTF-8" in r.stderr
    r = run_py(["-m", "raydpo.cli", "tiny-model", "--out", tmp_path / "m3", "--corpus", tmp_path / "missing.txt"], timeout=120)
    assert r.returncode == 2 and "missing.txt: No such file or directory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("preset,low,high", [("tiny", 0.3e6, 0.5e6), ("small", 24e6, 28e6), ("medium", 95e6, 105e6)])
def test_model_presets_build_the_sizes_they_name(tmp_path, style_corpus, preset, low, high):
    """model.preset=small|medium: ~26M and ~100M parameters, heads vLLM's CPU attention takes."""
    from raydpo.config_io import load_config
    from raydpo.tiny_model import build_model, train_tokenizer

    shape = load_config(None, [f"model.preset={preset}"]).model.tiny
    assert shape.hidden_size // shape.num_attention_heads in (32, 64)
    tokenizer = train_tokenizer(style_corpus, shape.vocab_size, "chatml")
    with torch.device("meta"):  # shapes only: 100M random weights would cost seconds
        model = build_model(tokenizer, shape, seed=0)
    assert low < count_parameters(model) < high


def test_explicit_shape_keys_win_over_the_preset():
    from raydpo.config import ConfigError
    from raydpo.config_io import load_config

    shape = load_config(None, ["model.preset=small", "model.tiny.num_hidden_layers=2"]).model.tiny
    assert (shape.hidden_size, shape.num_hidden_layers) == (512, 2)
    with pytest.raises(ConfigError, match="model.preset"):
        load_config(None, ["model.preset=huge"])
    with pytest.raises(ConfigError, match="model.preset: Input should be"):  # was a raw TypeError
        load_config(None, ["model.preset=[small]"])
    with pytest.raises(ConfigError, match="model.tiny: Input should be a valid dictionary"):
        load_config(None, ["model.preset=small", "model.tiny=3"])
