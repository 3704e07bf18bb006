"""Parity with TRL 1.16's DPOTrainer on the same model, batch and reference:
our data path produces TRL's exact tensors, and our losses give TRL's loss
to 1e-6 for every variant both have. TRL is a test dependency only."""

import random

import pytest
import torch

from raydpo.data.collate import collate_pairs
from raydpo.data.tokenize import tokenize_batch
from raydpo.tasks import style
from raydpo.losses import LossSettings
from raydpo.train.step import dpo_step_loss

CASES = [  # (our settings, TRL loss_type, TRL loss_weights, TRL label_smoothing)
    (LossSettings("sigmoid", beta=0.1), ["sigmoid"], None, 0.0),
    (LossSettings("sigmoid", beta=2.0), ["sigmoid"], None, 0.0),
    (LossSettings("hinge", beta=0.5), ["hinge"], None, 0.0),
    (LossSettings("ipo", beta=0.1), ["ipo"], None, 0.0),
    (LossSettings("robust", beta=0.1, label_smoothing=0.2), ["robust"], None, 0.2),
    (LossSettings("sigmoid", beta=0.1, rpo_alpha=0.5), ["sigmoid", "sft"], [1.0, 0.5], 0.0),
]


@pytest.fixture
def setup(tiny_model_dir, tiny_tokenizer):
    """Fresh models per test: DPOTrainer patches the models it is given (fused
    LM head), so a second trainer on the same objects would not be comparable."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference so the losses are not all ln 2
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rng = random.Random(0)
    rows = []
    for p in style.split_prompts()[0][:8]:
        a, b = style.demonstration(p, rng), style.demonstration(p, rng)
        rows.append({"prompt": p, "chosen": a, "rejected": b + " x"})
    return policy, reference, Dataset.from_list(rows), rows


def trl_batch_and_loss(setup, tok, loss_type, weights, eps, beta):
    from trl import DPOConfig, DPOTrainer

    policy, reference, ds, _ = setup
    args = DPOConfig(output_dir="/tmp/raydpo_trl_parity", per_device_train_batch_size=8, report_to="none", beta=beta,
                     loss_type=loss_type, loss_weights=weights, label_smoothing=eps, max_length=64, use_cpu=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return batch, loss.item()


@pytest.mark.parametrize("ours, loss_type, weights, eps", CASES, ids=lambda c: str(c) if isinstance(c, list) else None)
def test_loss_matches_trl(setup, tiny_tokenizer, ours, loss_type, weights, eps):
    policy, reference, _, _ = setup
    batch, trl_loss = trl_batch_and_loss(setup, tiny_tokenizer, loss_type, weights, eps, ours.beta)
    ours_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "loss_mask": batch["completion_mask"]}
    with torch.no_grad():
        loss, _ = dpo_step_loss(policy, reference, ours_batch, ours)
    assert loss.item() == pytest.approx(trl_loss, abs=1e-6)
    assert abs(trl_loss - 0.6931) > 1e-3 or loss_type != ["sigmoid"]  # a real, non-trivial value


def test_our_data_path_builds_trls_tensors(setup, tiny_tokenizer):
    """Same records through our tokenize_batch + collate_pairs: TRL's tensors,
    once the rows are put in the same order (TRL's sampler shuffles)."""
    _, _, _, rows = setup
    batch, _ = trl_batch_and_loss(setup, tiny_tokenizer, ["sigmoid"], None, 0.0, 0.1)
    cols = {"prompt": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
            "rejected": [r["rejected"] for r in rows], "is_chat": [False] * 8, "tools": [""] * 8}
    ours = collate_pairs(tokenize_batch(cols, tiny_tokenizer, 63, 64), pad_id=tiny_tokenizer.pad_token_id)
    key = lambda ids, mask: (tuple(ids.tolist()), tuple(mask.tolist()))  # noqa: E731
    trl_rows = sorted(key(i, m) for i, m in zip(batch["input_ids"], batch["completion_mask"]))
    our_rows = sorted(key(i, m) for i, m in zip(ours["input_ids"], ours["loss_mask"]))
    assert our_rows == trl_rows
