"""Bring your own model: a model folder raydpo cannot use is refused at start, by name, with the fix."""

import ast
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from raydpo.config_io import load_config
from raydpo.errors import ConfigError
from raydpo.model_check import CPU_HEAD_SIZES, check_model_folder, head_size


@pytest.fixture
def folder(tiny_model_dir, tmp_path):
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_a_usable_folder_passes(folder):
    check_model_folder(folder, sampled_on_cpu=True)


def test_pickled_weights_only_are_refused_naming_the_conversion(folder):
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model.path=.*pytorch_model.bin.*safetensors only.*save_pretrained"):
        check_model_folder(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        check_model_folder(folder)


def test_an_unreadable_config_is_named_as_such(folder):
    (folder / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="model.path=.*config.json cannot be read"):
        check_model_folder(folder)


def test_a_folder_without_a_tokenizer_is_refused(folder):
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            f.unlink()
    with pytest.raises(ConfigError, match="no usable tokenizer.*tokenizer.save_pretrained"):
        check_model_folder(folder)


def test_a_tokenizer_without_a_pad_token_is_refused(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token_id is None
    with pytest.raises(ConfigError, match="no pad token.*pad_token = tokenizer.eos_token"):
        check_model_folder(folder)
    check_model_folder(folder, needs_pad=False)  # an LLM judge only generates: no pad needed


def test_a_head_size_vllm_cpu_cannot_run_is_refused_only_where_it_samples(folder):
    import json

    cfg = json.loads((folder / "config.json").read_text())
    assert head_size(type("C", (), cfg)) in CPU_HEAD_SIZES
    cfg["head_dim"] = 24  # what a model with hidden 96 over 4 heads would have
    (folder / "config.json").write_text(json.dumps(cfg))
    check_model_folder(folder)  # SFT / offline DPO: no vLLM, no limit
    with pytest.raises(ConfigError, match="head size 24.*supports 32, 64.*cluster.sampler.gpus"):
        check_model_folder(folder, sampled_on_cpu=True)


def test_head_size_reads_each_architectures_own_names():
    from transformers import Gemma3Config, GPT2Config, LlamaConfig, Qwen3Config

    assert head_size(Gemma3Config(text_config={"head_dim": 96})) == 96  # multimodal: the text part's

    assert head_size(GPT2Config(n_embd=256, n_head=4)) == 64
    assert head_size(LlamaConfig(hidden_size=256, num_attention_heads=8, head_dim=None)) == 32
    assert head_size(Qwen3Config(hidden_size=256, num_attention_heads=2, head_dim=80)) == 80


def test_cpu_head_sizes_match_the_installed_vllm():
    """Read from vLLM's source, not imported (importing vLLM costs seconds)."""
    path = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]) / "v1/attention/backends/cpu_attn.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_supported_head_sizes")
    ret = next(n for n in ast.walk(fn) if isinstance(n, ast.Return))
    assert tuple(ast.literal_eval(ret.value)) == CPU_HEAD_SIZES


def test_the_jobs_and_the_judge_check_their_folders(folder, tmp_path):
    """The check is wired where the folders come in: model.path and judge.model_path."""
    from raydpo.job import base_model
    from raydpo.judge import kinds

    (folder / "model.safetensors").rename(folder / "model.bin")
    (folder / "model.bin").rename(folder / "pytorch_model.bin")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.path={folder}"])
    with pytest.raises(ConfigError, match="model.path=.*pytorch_model.bin"):
        base_model(cfg)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "judge.kind=reward_model", f"judge.model_path={folder}"])
    with pytest.raises(ConfigError, match="judge.model_path=.*pytorch_model.bin"):
        kinds.build(cfg)
