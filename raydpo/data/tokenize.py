"""Render and tokenize normalised preference pairs (pure: no Ray).

Truncation policy, explicit and counted:

* the prompt keeps its **last** ``max_prompt_length`` tokens (the end of a
  prompt is what the response answers);
* each response is then **cut** to ``max_length - len(prompt)`` tokens, and a
  cut response loses its EOS (it did not end there).

Text pairs get the tokenizer's EOS appended to each response; chat pairs are
rendered with the chat template, whose assistant turn already ends in EOS.
Prompt and responses are tokenized separately and concatenated, so the
boundary token is the same for chosen and rejected.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class RenderError(ValueError):
    pass


def render_chat(prompt_json: str, response_json: str, tools_json: str, tokenizer) -> tuple[str, str]:
    """(prompt text, response text) of a chat pair, via the chat template."""
    messages = json.loads(prompt_json)
    tools = json.loads(tools_json) if tools_json else None
    prompt_text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + json.loads(response_json), tools=tools, tokenize=False)
    if not full.startswith(prompt_text):
        raise RenderError("chat template does not render the prompt as a prefix of prompt + response")
    return prompt_text, full[len(prompt_text):]


def tokenize_batch(batch: Mapping[str, Sequence[Any]], tokenizer, max_prompt_length: int, max_length: int) -> dict:
    """Tokenize a column batch of normalised pairs.

    In: columns prompt, chosen, rejected (str), is_chat (bool), tools (str).
    Out: the input columns plus prompt_ids/chosen_ids/rejected_ids (lists of
    ints) and prompt_truncated/response_truncated (bools), all plain lists.
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    n = len(batch["prompt"])
    prompts, chosens, rejecteds = [], [], []
    for i in range(n):
        if batch["is_chat"][i]:
            p, c = render_chat(batch["prompt"][i], batch["chosen"][i], batch["tools"][i], tokenizer)
            _, r = render_chat(batch["prompt"][i], batch["rejected"][i], batch["tools"][i], tokenizer)
            prompts.append(p), chosens.append(c), rejecteds.append(r)
        else:
            prompts.append(batch["prompt"][i])
            chosens.append(batch["chosen"][i] + tokenizer.eos_token)
            rejecteds.append(batch["rejected"][i] + tokenizer.eos_token)
    # One batched call per column: the fast tokenizer parallelises in Rust.
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_ids, c_ids, r_ids = enc(prompts), enc(chosens), enc(rejecteds)

    out: dict[str, Any] = {k: list(v) for k, v in batch.items()}
    cols = {k: [] for k in TOKEN_COLUMNS}
    p_trunc, r_trunc = [], []
    for p, c, r in zip(p_ids, c_ids, r_ids):
        p_trunc.append(len(p) > max_prompt_length)
        p = p[-max_prompt_length:]
        room = max_length - len(p)
        r_trunc.append(len(c) > room or len(r) > room)
        cols["prompt_ids"].append(p)
        cols["chosen_ids"].append(c[:room])
        cols["rejected_ids"].append(r[:room])
    out.update(cols)
    out["prompt_truncated"] = p_trunc
    out["response_truncated"] = r_trunc
    return out
