"""A tokenizer that adds BOS (built like Llama 3's): the sampler, the online training rows, the
offline text path (which the reference pass tokenizes with) and chat rendering all use the same
context ids, with exactly one BOS, and the sampler's log-probs show that this is the context
the engine ran."""

import pytest
import torch

from raydpo.config import TinyModelConfig
from raydpo.records import SamplingSettings
from raydpo.tasks import style
from raydpo.tiny_model import build_tiny_model
from tests.test_sampler import hf_token_logps

PROMPTS = style.split_prompts()[1][:8]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, style_corpus):
    return build_tiny_model(style_corpus, tmp_path_factory.mktemp("bos") / "m", TinyModelConfig(initializer_range=0.2),
                            seed=0, tokenizer_style="llama3")


def test_the_tokenizer_adds_bos_like_llama3(llama3_dir):
    from transformers import AutoTokenizer

    from raydpo.data.tokenize import encode_prompts, special_prefix

    tok = AutoTokenizer.from_pretrained(llama3_dir)
    assert tok("about: x", add_special_tokens=True).input_ids[0] == tok.bos_token_id
    assert special_prefix(tok) == [tok.bos_token_id]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith(tok.bos_token)
    (ids,) = encode_prompts(tok, [chat])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS, not a second one


@pytest.mark.slow
def test_sampler_trainer_and_offline_path_share_the_context(ray_local, llama3_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.data.store import PreferenceStore, training_rows
    from raydpo.data.tokenize import tokenize_batch
    from raydpo.online.pairs import build_pairs
    from raydpo.sampler.pool import SamplerPool

    tok = AutoTokenizer.from_pretrained(llama3_dir)
    pool = SamplerPool(str(llama3_dir), 1)
    try:
        out = pool.sample(PROMPTS, SamplingSettings(n=2, temperature=1.0, max_new_tokens=8, seed=1))
    finally:
        pool.shutdown()
    expected = [tok(p, add_special_tokens=True).input_ids for p in PROMPTS]  # what HF gives: BOS + text
    assert all(e[0] == tok.bos_token_id and e.count(tok.bos_token_id) == 1 for e in expected)
    assert [list(out[2 * i].prompt_token_ids) for i in range(len(PROMPTS))] == expected
    model = AutoModelForCausalLM.from_pretrained(llama3_dir, dtype=torch.float32).eval()
    gaps = [abs(a - b) for s in out for a, b in zip(s.logprobs, hf_token_logps(model, s.prompt_token_ids, s.token_ids))]
    assert max(gaps) < 1e-4  # the engine ran on exactly these ids: one BOS
    without_bos = [abs(a - b) for s in out
                   for a, b in zip(s.logprobs, hf_token_logps(model, s.prompt_token_ids[1:], s.token_ids))]
    assert max(without_bos) > 1e-2  # and the check can tell: without BOS the log-probs differ
    # online training rows: the sampler's ids
    groups = [out[2 * i:2 * i + 2] for i in range(len(PROMPTS))]
    pairs, _ = build_pairs(groups, [[1.0, 0.0]] * len(groups), iteration=1, first_prompt=0, judge="t")
    store = PreferenceStore(tmp_path / "store")
    store.write_chunk(1, 0, pairs)
    rows, _ = training_rows(store.read_table([1]), "keep")
    assert rows.column("prompt_ids").to_pylist() == [list(p.prompt_token_ids) for p in pairs]
    # the offline text path (training and the precomputed reference pass both tokenize with it)
    cols = {"prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs], "rejected": [p.rejected for p in pairs],
            "is_chat": [False] * len(pairs), "tools": [""] * len(pairs)}
    offline = tokenize_batch(cols, tok, max_prompt_length=64, max_length=96)
    assert offline["prompt_ids"] == [list(p.prompt_token_ids) for p in pairs]
    # a long prompt keeps its end and its BOS
    cut = tokenize_batch({**cols, "prompt": [p.prompt * 20 for p in pairs]}, tok, max_prompt_length=16, max_length=40)
    assert all(len(p) == 16 and p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1 for p in cut["prompt_ids"])
