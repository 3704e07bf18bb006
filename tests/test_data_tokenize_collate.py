"""Tokenization (truncation policy, EOS, chat rendering) and the collator, with
literal token tensors."""

import json

import numpy as np
import pytest

from raydpo.data.collate import bucket_by_length, collate_pairs, collate_shared_prefix
from raydpo.data.tokenize import tokenize_batch


def batch_of(*pairs, chat=False):
    return {
        "prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs], "rejected": [r for _, _, r in pairs],
        "is_chat": [chat] * len(pairs), "tools": [""] * len(pairs),
    }


def test_text_pair_gets_eos_and_prompt_keeps_its_end(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, chosen, rejected = "about: apple | max 5\n", " apple please.", " pear"
    out = tokenize_batch(batch_of((prompt, chosen, rejected)), tok, max_prompt_length=4, max_length=64)
    p_full = tok(prompt, add_special_tokens=False).input_ids
    assert len(p_full) > 4
    assert out["prompt_ids"][0] == p_full[-4:]  # the END of the prompt is kept
    assert out["chosen_ids"][0] == tok(chosen, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert out["rejected_ids"][0][-1] == tok.eos_token_id
    assert out["prompt_truncated"] == [True] and out["response_truncated"] == [False]


def test_response_is_cut_to_fit_and_loses_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, long = "about: apple | max 5\n", " apple is very very big red old new fine please."
    p_len = len(tok(prompt).input_ids)
    out = tokenize_batch(batch_of((prompt, long, " pear")), tok, max_prompt_length=p_len, max_length=p_len + 6)
    assert len(tok(long).input_ids) > 6
    assert out["chosen_ids"][0] == tok(long).input_ids[:6]  # cut, no EOS
    assert out["rejected_ids"][0] == tok(" pear").input_ids + [tok.eos_token_id]  # fits: untouched
    assert out["prompt_truncated"] == [False] and out["response_truncated"] == [True]


def test_chat_pair_rendered_with_template(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "user", "content": "2+2?"}]
    b = batch_of((json.dumps(msgs), json.dumps([{"role": "assistant", "content": "4"}]),
                  json.dumps([{"role": "assistant", "content": "5"}])), chat=True)
    out = tokenize_batch(b, tok, max_prompt_length=64, max_length=128)
    assert tok.decode(out["prompt_ids"][0]) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(out["chosen_ids"][0]) == "4<|im_end|>\n"  # EOS from the template, not added twice
    assert tok.decode(out["rejected_ids"][0]) == "5<|im_end|>\n"


def test_chat_records_without_a_chat_template_are_refused_by_name(tiny_model_dir):
    from transformers import AutoTokenizer

    from raydpo.errors import DataError

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    b = batch_of((json.dumps([{"role": "user", "content": "2+2?"}]), json.dumps([{"role": "assistant", "content": "4"}]),
                  json.dumps([{"role": "assistant", "content": "5"}])), chat=True)
    with pytest.raises(DataError, match="need a chat template.*tokenizer.chat_template"):
        tokenize_batch(b, tok, max_prompt_length=64, max_length=128)
    tokenize_batch(batch_of(("a", "b", "c")), tok, max_prompt_length=8, max_length=16)  # plain text needs none


def test_prompt_longer_than_total_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="must be below max_length"):
        tokenize_batch(batch_of(("a", "b", "c")), tiny_tokenizer, max_prompt_length=8, max_length=8)


# pair 0: prompt [5, 6], chosen [10, 11, 1], rejected [20, 1]; pair 1: prompt [7], chosen [12, 1],
# rejected [21, 22, 23, 1]; with precomputed reference log-probs
TWO_PAIRS = {
    "prompt_ids": [np.array([5, 6]), np.array([7])],
    "chosen_ids": [np.array([10, 11, 1]), np.array([12, 1])],
    "rejected_ids": [np.array([20, 1]), np.array([21, 22, 23, 1])],
    "reference_chosen_logps": [-1.5, -2.0],
    "reference_rejected_logps": [-3.0, -4.5],
}


def test_collate_literal_tensors():
    batch = TWO_PAIRS
    out = collate_pairs(batch, pad_id=0)
    # rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    assert out["input_ids"].tolist() == [
        [5, 6, 10, 11, 1],
        [7, 12, 1, 0, 0],
        [5, 6, 20, 1, 0],
        [7, 21, 22, 23, 1],
    ]
    assert out["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert out["loss_mask"].tolist() == [  # prompt masked, padding masked
        [0, 0, 1, 1, 1],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 1, 1, 1, 1],
    ]
    assert out["reference_chosen_logps"].tolist() == [-1.5, -2.0]
    assert out["reference_rejected_logps"].tolist() == [-3.0, -4.5]
    padded = collate_pairs(batch, pad_id=0, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (4, 8) and padded["loss_mask"][:, 5:].sum() == 0


def test_collate_shared_prefix_literal_tensors():
    """Pair 0: prompt [5, 6], chosen [10, 11, 1], rejected [20, 1]  -> 7 tokens.
    Pair 1: prompt [7], chosen [12, 1], rejected [21, 22, 23, 1]      -> 7 tokens.
    Rejected tokens restart at the position after the prompt and cannot see the
    chosen tokens; the first rejected token is predicted by the last prompt token."""
    batch = TWO_PAIRS
    out = collate_shared_prefix(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 10, 11, 1, 20, 1], [7, 12, 1, 21, 22, 23, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 2, 1, 2, 3, 4]]
    assert out["source_index"].tolist() == [[0, 0, 1, 2, 3, 1, 5], [0, 0, 1, 0, 3, 4, 5]]
    assert out["chosen_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0]]
    assert out["rejected_mask"].tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
    assert out["lengths"].tolist() == [7, 7]
    m = out["attention_mask"].int()
    assert m.shape == (2, 1, 7, 7)
    assert m[0, 0].tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],  # rejected: prompt and itself, not the chosen tokens
        [1, 1, 0, 0, 0, 1, 1],
    ]
    assert out["reference_chosen_logps"].tolist() == [-1.5, -2.0]
    # a shorter pair is right-padded; its pad rows see only earlier tokens (no all-masked row)
    short = collate_shared_prefix({"prompt_ids": [batch["prompt_ids"][0], np.array([8])],
                                   "chosen_ids": [batch["chosen_ids"][0], np.array([12, 1])],
                                   "rejected_ids": [batch["rejected_ids"][0], np.array([9])]}, pad_id=0)
    assert short["input_ids"][1].tolist() == [8, 12, 1, 9, 0, 0, 0]
    assert short["chosen_mask"][1].tolist() == [0, 1, 1, 0, 0, 0, 0]
    assert short["rejected_mask"][1].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert short["attention_mask"][1, 0].any(-1).all()


def test_bucketing_keeps_every_row_and_pads_less():
    rng = np.random.default_rng(0)
    n = 64
    lens = rng.integers(1, 40, size=n)
    window = {
        "prompt_ids": [np.arange(3) for _ in range(n)],
        "chosen_ids": [np.arange(int(l)) for l in lens],
        "rejected_ids": [np.arange(2) for _ in range(n)],
        "row": list(range(n)),
    }
    batches = list(bucket_by_length([window], batch_size=8, seed=1))
    assert sorted(r for b in batches for r in b["row"]) == list(range(n))

    def padding(bs):
        return sum(int((1 - collate_pairs(b, 0)["attention_mask"]).sum()) for b in bs)

    plain = [{k: v[i:i + 8] for k, v in window.items()} for i in range(0, n, 8)]
    assert padding(batches) < padding(plain) / 2
    assert [b["row"] for b in bucket_by_length([window], 8, seed=1)] == [b["row"] for b in batches]  # seeded
    assert len(list(bucket_by_length([{k: v[:20] for k, v in window.items()}], 8, drop_last=True))) == 2
