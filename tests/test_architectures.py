"""The fast subset of bench/architectures.py: one architecture other than the tiny Llama,
through vLLM, greedy parity with transformers, LoRA and both publish routes (the Ray Train
steps are the bench's). Gemma 2: its vLLM model has no lm_head, which the publish must respect."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_gemma2_passes_the_matrix_without_training(ray_local, tmp_path, style_corpus):
    import architectures

    from raydpo.tiny_model import build_tiny_model

    tokenizers = {s: build_tiny_model(style_corpus, tmp_path / f"tok-{s}", tokenizer_style=s)
                  for s in ("chatml", "llama3")}
    res = architectures.run_arch("gemma2", tmp_path, tokenizers, skip_train=True)
    assert {c: v for c, v in res.items() if c not in ("sft_step", "dpo_step")} == {
        "vllm_load": "ok", "greedy": "ok", "lora": "ok", "publish_store": "ok", "publish_path": "ok"}
    assert res["sft_step"] == res["dpo_step"] == "-"
