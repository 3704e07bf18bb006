"""Batch tokenized pairs into padded tensors, and bucket by length.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def pair_length(batch: Mapping[str, Sequence[Any]], i: int) -> int:
    return len(batch["prompt_ids"][i]) + max(len(batch["chosen_ids"][i]), len(batch["rejected_ids"][i]))


def bucket_by_length(
    windows: Iterable[Mapping[str, Sequence[Any]]], batch_size: int, seed: int = 0, drop_last: bool = False
) -> Iterator[dict[str, list]]:
    """Split each window of rows into batches of similar length.

    Give it windows of a few batches each (e.g. ``iter_batches(batch_size=8 * B)``):
    rows are sorted by length inside the window and cut into batches of
    `batch_size`; the batches of a window are then yielded in a seeded random
    order, so training does not see short-to-long sweeps. Less padding, the
    same rows. A short tail batch is kept unless `drop_last`.
    """
    for w, window in enumerate(windows):
        n = _rows(window)
        order = sorted(range(n), key=lambda i: pair_length(window, i))
        chunks = [order[s : s + batch_size] for s in range(0, n, batch_size)]
        if drop_last and chunks and len(chunks[-1]) < batch_size:
            chunks.pop()
        random.Random(seed * 1_000_003 + w).shuffle(chunks)
        for idx in chunks:
            yield {k: [window[k][i] for i in idx] for k in window}
