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

Prompts get the tokenizer's leading special tokens (a BOS, for Llama 3, Gemma,
Mistral, ...) exactly as `encode_prompts` adds them, and the sampler encodes
its prompts with the same function: the trainer, the reference pass, the KL
estimate and the sampler all see the same context ids.

Online pairs do not come through here: they are trained on the token ids the
sampler produced (`raydpo.data.store.training_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from raydpo.errors import DataError

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class RenderError(DataError):
    """A record that cannot be rendered into tokens (e.g. chat data without a chat template)."""


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts *before* a text when asked for special tokens (e.g. [BOS]
    for Llama 3; [] for GPT-2, Qwen or the tiny model). Anything it would put after the
    text (an EOS) is left out: a prompt is continued, not ended."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    raise ValueError(f"{type(tokenizer).__name__}: cannot tell which special tokens it adds before a text")


def encode_prompts(tokenizer, texts: Sequence[str], prefix: Sequence[int] | None = None) -> list[list[int]]:
    """Prompt ids as the sampler and the trainer both use them: the text's tokens, after the
    tokenizer's leading special tokens unless the text already starts with them (a chat
    template that writes the BOS itself). `prefix`: `special_prefix(tokenizer)`, if known."""
    prefix = special_prefix(tokenizer) if prefix is None else list(prefix)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if not prefix:
        return [list(x) for x in ids]
    return [list(x) if list(x[:len(prefix)]) == prefix else prefix + list(x) for x in ids]


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
    if any(batch["is_chat"]) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"chat records (messages) need a chat template, and the tokenizer "
                        f"{getattr(tokenizer, 'name_or_path', '')!r} has none: set tokenizer.chat_template and "
                        f"tokenizer.save_pretrained(folder), or give plain-text prompt / chosen / rejected")
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
    prefix = special_prefix(tokenizer)
    p_ids, c_ids, r_ids = encode_prompts(tokenizer, prompts, prefix), enc(chosens), enc(rejecteds)

    out: dict[str, Any] = {k: list(v) for k, v in batch.items()}
    cols = {k: [] for k in TOKEN_COLUMNS}
    p_trunc, r_trunc = [], []
    for p, c, r in zip(p_ids, c_ids, r_ids):
        p_trunc.append(len(p) > max_prompt_length)
        if len(p) > max_prompt_length:  # keep the end, and the leading BOS the model expects
            keep = p[:len(prefix)] if prefix and p[:len(prefix)] == prefix else []
            p = keep + p[len(p) - max_prompt_length + len(keep):]
        room = max_length - len(p)
        r_trunc.append(len(c) > room or len(r) > room)
        cols["prompt_ids"].append(p)
        cols["chosen_ids"].append(c[:room])
        cols["rejected_ids"].append(r[:room])
    out.update(cols)
    out["prompt_truncated"] = p_trunc
    out["response_truncated"] = r_trunc
    return out
