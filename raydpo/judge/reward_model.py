"""A Bradley-Terry reward model as a scorer (pure torch + transformers; no Ray).
Train one with jobs/train_reward.py; serve it with judge.kind=reward_model."""

from __future__ import annotations


class RewardModelScorer:
    """Scores (prompt, response) with a Bradley-Terry reward model (an HF
    sequence-classification folder, e.g. from jobs/train_reward.py), rendered and
    tokenized exactly as in training (text pairs: prompt, then response + EOS)."""

    def __init__(self, model_path: str, max_prompt_length: int = 128, max_length: int = 192,
                 trust_remote_code: bool = False, num_threads: int = 1):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(max(1, num_threads))  # Ray leaves torch at 1 thread; see raydpo.train.staged
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_path}: a reward model has one output (num_labels=1), "
                             f"this one has {self.model.config.num_labels}")
        self.max_prompt_length, self.max_length = max_prompt_length, max_length

    def __call__(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        from raydpo.data.collate import collate_pairs
        from raydpo.data.tokenize import tokenize_batch
        from raydpo.train.step import sequence_rewards

        n = len(pairs)
        cols = {"prompt": [p for p, _ in pairs], "chosen": [r for _, r in pairs], "rejected": [r for _, r in pairs],
                "is_chat": [False] * n, "tools": [""] * n}
        batch = collate_pairs(tokenize_batch(cols, self.tokenizer, self.max_prompt_length, self.max_length),
                              self.tokenizer.pad_token_id)
        with torch.no_grad():  # the chosen half of the collated batch is the responses as given
            return sequence_rewards(self.model, batch["input_ids"][:n], batch["attention_mask"][:n]).tolist()


def pairwise_accuracy(scorer: RewardModelScorer, pairs: list[dict]) -> float:
    """Share of {prompt, chosen, rejected} pairs the reward model scores chosen above rejected."""
    rc = scorer([(p["prompt"], p["chosen"]) for p in pairs])
    rr = scorer([(p["prompt"], p["rejected"]) for p in pairs])
    return sum(c > r for c, r in zip(rc, rr)) / len(pairs)


def held_out_row(cfg, ckpt, eval_path: str) -> tuple[str, str]:
    """The reward job's closing-table row: pairwise accuracy on held-out pairs, also saved
    to <run_dir>/reward_eval.json."""
    import json
    from pathlib import Path

    from raydpo.data.formats import text_pairs

    text, skipped = text_pairs(eval_path, cfg.data.format)
    if not text:
        return f"held-out pairwise accuracy (0 pairs, {skipped} skipped)", "n/a"
    acc = pairwise_accuracy(RewardModelScorer(str(ckpt), cfg.data.max_prompt_length, cfg.data.max_length), text)
    (Path(cfg.run_dir) / "reward_eval.json").write_text(json.dumps({"accuracy": acc, "pairs": len(text),
                                                                     "skipped": skipped}))
    return f"held-out pairwise accuracy ({len(text)} pairs, {skipped} skipped)", f"{acc:.3f}"
