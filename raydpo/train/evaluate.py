"""Offline evaluation of a policy on preference pairs: implicit reward margins and preference
accuracy against a reference (pure torch; no Ray)."""

from __future__ import annotations

import torch

from raydpo.data.collate import collate_pairs
from raydpo.data.tokenize import tokenize_batch
from raydpo.train.step import frozen_logps


@torch.no_grad()
def implicit_reward_margins(policy, reference, tokenizer, pairs: list[dict], max_prompt_length: int = 64,
                            max_length: int = 128, batch_size: int = 64) -> torch.Tensor:
    """(pc - rc) - (pr - rr) for each {prompt, chosen, rejected} text pair, (N,).
    Positive where the policy prefers the chosen response more than the reference does.
    Both models run in eval mode (no dropout); their modes are restored after."""
    modes = policy.training, reference.training
    policy.eval()
    reference.eval()
    try:
        return _margins(policy, reference, tokenizer, pairs, max_prompt_length, max_length, batch_size)
    finally:
        policy.train(modes[0])
        reference.train(modes[1])


def _margins(policy, reference, tokenizer, pairs, max_prompt_length, max_length, batch_size) -> torch.Tensor:
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        cols = {"prompt": [p["prompt"] for p in chunk], "chosen": [p["chosen"] for p in chunk],
                "rejected": [p["rejected"] for p in chunk], "is_chat": [False] * len(chunk), "tools": [""] * len(chunk)}
        batch = collate_pairs(tokenize_batch(cols, tokenizer, max_prompt_length, max_length), tokenizer.pad_token_id)
        pc, pr = frozen_logps(policy, batch)
        rc, rr = frozen_logps(reference, batch)
        out.append((pc - rc) - (pr - rr))
    return torch.cat(out)


def preference_accuracy(policy, reference, tokenizer, pairs: list[dict], **kw) -> float:
    """Share of pairs whose implicit reward margin is positive (ties count 0)."""
    return float((implicit_reward_margins(policy, reference, tokenizer, pairs, **kw) > 0).float().mean())


def held_out_row(cfg, ckpt, base) -> tuple[str, str]:
    """The DPO job's closing-table row: preference accuracy of the trained policy against
    its base on data.eval_path (text pairs; what was skipped is said, never silent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.data.formats import text_pairs

    text, skipped = text_pairs(cfg.data.eval_path, cfg.data.format)
    label = f"held-out preference accuracy ({len(text)} pairs" + (f"; {skipped} skipped)" if skipped else ")")
    if not text:
        return label, "n/a"
    acc = preference_accuracy(AutoModelForCausalLM.from_pretrained(ckpt), AutoModelForCausalLM.from_pretrained(base),
                              AutoTokenizer.from_pretrained(base), text, max_prompt_length=cfg.data.max_prompt_length,
                              max_length=cfg.data.max_length)
    return label, f"{acc:.3f}"
