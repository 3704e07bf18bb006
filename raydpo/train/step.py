"""One SFT or DPO step's math on a collated batch (pure torch; no Ray).

A DPO batch holds 2B sequences, chosen rows first (`collate_pairs`), or B rows of
prompt + chosen + rejected (`collate_shared_prefix`); `forward_logps` takes either.
"""

from __future__ import annotations

import torch

from raydpo.errors import ConfigError
from raydpo.losses import LossSettings, nll_loss, response_lengths, sequence_logps, shared_prefix_logps

Tensor = torch.Tensor


def is_shared_prefix(batch: dict[str, Tensor]) -> bool:
    return "source_index" in batch


def _attention_implementation(model) -> str:
    while hasattr(model, "module"):  # DDP and DeepSpeed wrap the HF model (a DeepSpeed engine's .config is its own)
        model = model.module
    if hasattr(model, "peft_model"):  # the LoRA reference: the policy with adapters off
        model = model.peft_model
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def _custom_mask(model, mask: Tensor) -> Tensor:
    """The shared-prefix (B, 1, T, T) bool mask in the form the attention kernel takes:
    sdpa takes bool as is; eager adds it to the scores, so it needs 0 / -inf-like floats.
    Flash-attention kernels take no arbitrary mask: use trainer.shared_prefix=false there."""
    impl = _attention_implementation(model)
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    raise ConfigError(f"trainer.shared_prefix needs an attention implementation that takes a custom mask "
                     f"(sdpa or eager); this model uses {impl!r}: set trainer.shared_prefix=false")


def forward_logps(model, batch: dict[str, Tensor]) -> Tensor:
    """Summed response log-probs, (2B,): chosen then rejected, in either layout."""
    if is_shared_prefix(batch):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=_custom_mask(model, batch["attention_mask"]), use_cache=False).logits
        return shared_prefix_logps(logits, batch["input_ids"], batch["source_index"], batch["chosen_mask"],
                                   batch["rejected_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, batch["input_ids"], batch["loss_mask"])  # (2B,)


def batch_response_lengths(batch: dict[str, Tensor]) -> Tensor:
    """Scored tokens per response, (2B,), chosen then rejected, in either layout."""
    if is_shared_prefix(batch):
        return torch.cat([batch["chosen_mask"].sum(-1), batch["rejected_mask"].sum(-1)])
    return response_lengths(batch["loss_mask"])


def batch_tokens(batch: dict[str, Tensor]) -> int:
    """Real (non-pad) tokens the batch runs through the model."""
    if is_shared_prefix(batch):
        return int(batch["lengths"].sum())
    return int(batch["attention_mask"].sum())


def precision(bf16: bool, device_type: str):
    """The context every forward pass runs in, policy and reference alike, on any device:
    bf16 autocast when model.dtype is bfloat16, else float32. The precomputed reference
    (`raydpo.train.reference.precompute_reference`) uses it too, so its log-probs have the
    precision the live reference would have."""
    from contextlib import nullcontext

    import torch

    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def frozen_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed response log-probs, each (B,), without a graph: the
    reference's in a step, or any model's when it is only measured (evaluation, KL)."""
    return forward_logps(model, batch).chunk(2)


def dpo_loss(policy_logps: Tensor, reference_chosen: Tensor | None, reference_rejected: Tensor | None,
             lengths: Tensor, s: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss (mean over pairs) and detached metrics from (2B,) policy log-probs."""
    pc, pr = policy_logps.chunk(2)  # (B,), (B,)
    lc, lr = lengths.chunk(2)
    spec = s.spec
    if spec.length_normalised:  # IPO, SimPO: per-token mean log-probs
        pc_, pr_ = pc / lc.clamp(min=1), pr / lr.clamp(min=1)
    else:
        pc_, pr_ = pc, pr
    args = [pc_, pr_]
    if spec.needs_reference:
        rc, rrf = reference_chosen, reference_rejected
        args += [rc / lc.clamp(min=1), rrf / lr.clamp(min=1)] if spec.length_normalised else [rc, rrf]
    losses, cr, rr = spec.fn(*args, s.beta, **s.options())
    loss = losses.mean()
    if s.rpo_alpha:
        loss = loss + s.rpo_alpha * nll_loss(pc, lc)
    metrics = {
        "loss": loss.detach(),
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (cr - rr).mean(),
        "rewards/accuracies": (cr > rr).float().mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    if reference_chosen is not None:
        # mean log(pi/pi_ref) over the batch's responses: a KL(pi||pi_ref) estimate only
        # when the responses were sampled from pi (online DPO); offline it is a drift measure.
        metrics["kl_estimate"] = torch.cat([pc - reference_chosen, pr - reference_rejected]).detach().mean()
    return loss, metrics


def dpo_step_loss(policy, reference, batch: dict[str, Tensor], s: LossSettings) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward the policy (and the reference, unless precomputed log-probs are in
    the batch or the loss is reference-free) and return (loss, metrics)."""
    lengths = batch_response_lengths(batch)
    if not s.needs_reference:
        rc = rr = None
    elif "reference_chosen_logps" in batch:
        rc, rr = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    else:
        rc, rr = frozen_logps(reference, batch)
    return dpo_loss(forward_logps(policy, batch), rc, rr, lengths, s)


def sft_loss(model, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean NLL of the response tokens. SFT batches use the same collated
    layout; only the first half (chosen rows) is trained on."""
    ids, am, lm = (batch[k].chunk(2)[0] for k in ("input_ids", "attention_mask", "loss_mask"))
    logps = sequence_logps(model(input_ids=ids, attention_mask=am, use_cache=False).logits, ids, lm)
    loss = nll_loss(logps, response_lengths(lm))
    return loss, {"loss": loss.detach()}


def sequence_rewards(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar reward per sequence from a sequence-classification head (num_labels=1),
    read at the last non-pad token (transformers does that from config.pad_token_id)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """-log sigmoid(r_c - r_r), mean over pairs (Bradley-Terry), and detached metrics.

    Hand check: r_c = r_r gives ln 2 = 0.6931; r_c - r_r = 2 gives log(1 + e^-2) = 0.1269.
    """
    margin = reward_chosen - reward_rejected
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return loss, {"loss": loss.detach(), "accuracy": (margin > 0).float().mean().detach(),
                  "margin": margin.mean().detach(), "reward/chosen": reward_chosen.mean().detach(),
                  "reward/rejected": reward_rejected.mean().detach()}


def reward_step_loss(model, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model step on a collated pair batch (chosen rows first)."""
    rc, rr = sequence_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    return bradley_terry_loss(rc, rr)
