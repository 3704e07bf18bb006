"""Batch tokenized pairs into padded tensors, and bucket by length.

Two layouts: `collate_pairs` (below; TRL's, used for SFT, reward models and the
parity tests) and `collate_shared_prefix` (one row per pair, prompt run once;
DPO training and reference scoring by default, `trainer.shared_prefix`).

A batch of B pairs becomes 2B sequences, chosen rows first::

    input_ids       (2B, T)  prompt + response, right-padded with pad_id
    attention_mask  (2B, T)  1 on real tokens
    loss_mask       (2B, T)  1 on response tokens only (prompt and padding 0)

T is the longest sequence in *this* batch (dynamic padding), rounded up to
`pad_to_multiple_of`. `loss_mask` marks the tokens to score; the shift by one
(position t is predicted by the logits at t-1) happens in
`raydpo.losses.sequence_logps`, in one place.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")


def _rows(batch: Mapping[str, Sequence[Any]]) -> int:
    return len(batch["prompt_ids"])


def collate_pairs(batch: Mapping[str, Sequence[Any]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Column batch (prompt_ids, chosen_ids, rejected_ids[, reference_*_logps]) -> tensors."""
    b = _rows(batch)
    seqs, prompt_lens = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for i in range(b):
            p, r = list(batch["prompt_ids"][i]), list(batch[key][i])
            seqs.append(p + r)
            prompt_lens.append(len(p))
    t = max(len(s) for s in seqs)
    t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((2 * b, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((2 * b, t), dtype=torch.long)
    loss_mask = torch.zeros((2 * b, t), dtype=torch.long)
    for row, (s, pl) in enumerate(zip(seqs, prompt_lens)):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[row, : len(s)] = 1
        loss_mask[row, pl : len(s)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    for key in REFERENCE_COLUMNS:
        if key in batch:
            out[key] = torch.as_tensor(list(batch[key]), dtype=torch.float32)
    return out


def collate_shared_prefix(batch: Mapping[str, Sequence[Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Column batch -> one row per pair holding prompt + chosen + rejected once each.

    The prompt is run once instead of twice. Positions restart after the chosen
    response, so the rejected tokens sit at the positions they would have right
    after the prompt, and the attention mask hides the chosen tokens from them:
    every response token sees exactly what it sees in `collate_pairs`' layout, so
    the log-probs are the same (up to float rounding) for ~(2p + c + r) / (p + c + r)
    less work. A pair whose prompt is as long as its responses costs 2/3.

        input_ids       (B, T)     prompt, chosen, rejected; right-padded with pad_id
        position_ids    (B, T)     0..p-1, p..p+c-1, p..p+r-1, then 0 on padding
        attention_mask  (B, 1, T, T) bool, True = may attend: causal, except that
                        rejected queries never see chosen keys
        source_index    (B, T)     for a scored token at j, the position whose
                        logits predict it (j-1, but p-1 for the first rejected token)
        chosen_mask, rejected_mask (B, T)  1 on the scored tokens of each response
        lengths         (B,)       p + c + r, the real tokens of each row

    Pad queries attend to the real tokens before them (never to nothing, which
    would give NaN); no real query sees padding (it comes after, causal).
    """
    b = _rows(batch)
    lens = [(len(batch["prompt_ids"][i]), len(batch["chosen_ids"][i]), len(batch["rejected_ids"][i])) for i in range(b)]
    t = max(p + c + r for p, c, r in lens)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    source_index = torch.zeros((b, t), dtype=torch.long)
    chosen_mask = torch.zeros((b, t), dtype=torch.long)
    rejected_mask = torch.zeros((b, t), dtype=torch.long)
    attention = torch.ones((t, t), dtype=torch.bool).tril().repeat(b, 1, 1)  # (B, T, T) causal
    for i, (p, c, r) in enumerate(lens):
        ids = list(batch["prompt_ids"][i]) + list(batch["chosen_ids"][i]) + list(batch["rejected_ids"][i])
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[i, : p + c] = torch.arange(p + c)
        position_ids[i, p + c : p + c + r] = torch.arange(p, p + r)
        source_index[i, 1 : p + c + r] = torch.arange(p + c + r - 1)
        source_index[i, p + c] = p - 1  # the first rejected token follows the prompt, not the chosen response
        # as in collate_pairs, position 0 has no logits before it: with an empty prompt the
        # first token of each response goes unscored (tokenized prompts are never empty)
        chosen_mask[i, max(p, 1) : p + c] = 1
        rejected_mask[i, p + c + (p == 0) : p + c + r] = 1
        attention[i, p + c : p + c + r, p : p + c] = False
    out = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention.unsqueeze(1),
           "source_index": source_index, "chosen_mask": chosen_mask, "rejected_mask": rejected_mask,
           "lengths": torch.tensor([p + c + r for p, c, r in lens], dtype=torch.long)}
    for key in REFERENCE_COLUMNS:
        if key in batch:
            out[key] = torch.as_tensor(list(batch[key]), dtype=torch.float32)
    return out


def pair_length(batch: Mapping[str, Sequence[Any]], i: int) -> int:
    """Row length of pair i in `collate_pairs`' layout (the longer of its two rows)."""
    return len(batch["prompt_ids"][i]) + max(len(batch["chosen_ids"][i]), len(batch["rejected_ids"][i]))


def shared_row_length(batch: Mapping[str, Sequence[Any]], i: int) -> int:
    """Row length of pair i in `collate_shared_prefix`' layout."""
    return len(batch["prompt_ids"][i]) + len(batch["chosen_ids"][i]) + len(batch["rejected_ids"][i])


@dataclass(frozen=True)
class Layout:
    """How pairs become model rows: the collate function and the per-pair row length
    that bucketing sorts by (the length that padding follows in that layout)."""

    collate: Callable[..., dict[str, torch.Tensor]]
    length: Callable[[Mapping[str, Sequence[Any]], int], int]


TWO_ROWS = Layout(collate_pairs, pair_length)
SHARED_PREFIX = Layout(collate_shared_prefix, shared_row_length)


def layout(shared_prefix: bool) -> Layout:
    return SHARED_PREFIX if shared_prefix else TWO_ROWS


def bucket_by_length(
    windows: Iterable[Mapping[str, Sequence[Any]]], batch_size: int, seed: int = 0, drop_last: bool = False,
    length=pair_length,
) -> Iterator[dict[str, list]]:
    """Split each window of rows into batches of similar length.

    Give it windows of a few batches each (e.g. ``iter_batches(batch_size=8 * B)``):
    rows are sorted by length inside the window and cut into batches of
    `batch_size`; the batches of a window are then yielded in a seeded random
    order, so training does not see short-to-long sweeps. Less padding, the
    same rows. A short tail batch is kept unless `drop_last`. `length(window, i)`
    is the padded length that matters: `pair_length` or `shared_row_length`.
    """
    for w, window in enumerate(windows):
        n = _rows(window)
        order = sorted(range(n), key=lambda i: length(window, i))
        chunks = [order[s : s + batch_size] for s in range(0, n, batch_size)]
        if drop_last and chunks and len(chunks[-1]) < batch_size:
            chunks.pop()
        random.Random(seed * 1_000_003 + w).shuffle(chunks)
        for idx in chunks:
            yield {k: [window[k][i] for i in idx] for k in window}
