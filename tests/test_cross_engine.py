"""vLLM (CPU build) and transformers load the tiny-model folder unchanged and
agree on greedy decoding token for token: the check later work relies on."""

import json

import torch

from raydpo.config import TinyModelConfig
from raydpo.tasks import style
from raydpo.tiny_model import build_tiny_model
from tests.helpers.proc import run_py

import pytest

pytestmark = pytest.mark.slow  # starts Ray, vLLM or Serve, or trains: `make test-fast` leaves it out

MAX_NEW = 24


def test_vllm_and_transformers_greedy_ids_identical(tmp_path, style_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A larger init std than the default gives peaked, prompt-dependent logits, so
    # the comparison is not decided by near-ties and the outputs differ per prompt.
    out = build_tiny_model(style_corpus, tmp_path / "m", TinyModelConfig(initializer_range=0.2), seed=0)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompts = [tok(p).input_ids for p in style.split_prompts()[1][:24]]
    prompts.append(tok("a prompt of another shape, longer than the rest of them")["input_ids"])

    with torch.no_grad():
        expected = []
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)
            expected.append(gen[0, len(ids):].tolist())

    pfile = tmp_path / "prompts.json"
    pfile.write_text(json.dumps(prompts))
    r = run_py(["tests/helpers/vllm_greedy.py", out, pfile, MAX_NEW], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT_JSON "))
    got = json.loads(line.removeprefix("RESULT_JSON "))

    assert len({tuple(e) for e in expected}) > len(prompts) // 2, "outputs barely depend on the prompt: weak test"
    assert got == expected
