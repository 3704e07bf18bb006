"""Preference losses as pure functions of per-sequence log-probs (no Ray).

Notation (B pairs)::

    policy_chosen_logps, policy_rejected_logps        (B,)  log pi_theta(y|x)
    reference_chosen_logps, reference_rejected_logps  (B,)  log pi_ref(y|x)
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)   (B,)

Every loss returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,),
with **no reduction**; rewards are the detached implicit rewards
``beta * (policy - reference)`` (SimPO: ``beta * policy``). Each variant is its
own function, registered once in `LOSSES` with what it needs (`LossSpec`): adding a
loss is one function, one registry line and its test. `trainer.loss` names a key of
`LOSSES`; `raydpo.train.step.dpo_loss` calls any of them the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of log-probs of the masked tokens of each sequence.

    logits (N, T, V), input_ids (N, T), loss_mask (N, T) with 1 on the tokens
    to score. Token t is predicted by the logits at t-1, so the logits are
    shifted left by one against the ids and mask; position 0 is never scored.
    Returns (N,). Computed as ``logit[y] - logsumexp(logits)`` to avoid
    materialising a full (N, T, V) log-softmax.
    """
    logits = logits[:, :-1, :].float()  # (N, T-1, V) predicts tokens 1..T-1
    labels = input_ids[:, 1:]  # (N, T-1)
    mask = loss_mask[:, 1:].to(logits.dtype)  # (N, T-1)
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N, T-1)
    return (token_logps * mask).sum(-1)


def shared_prefix_logps(logits: Tensor, input_ids: Tensor, source_index: Tensor, chosen_mask: Tensor,
                        rejected_mask: Tensor) -> Tensor:
    """`sequence_logps` for the shared-prefix layout (`raydpo.data.collate.collate_shared_prefix`):
    one row per pair holds prompt + chosen + rejected, and the token at j is predicted by
    the logits at ``source_index[j]`` (j-1, except the first rejected token: the last
    prompt token). Returns (2B,): chosen sums then rejected sums, like `sequence_logps`
    on `collate_pairs`' 2B rows. Gathers from the flattened logits instead of building a
    re-ordered (B, T, V) copy.
    """
    logits = logits.float()
    b, t, v = logits.shape
    lse = torch.logsumexp(logits, dim=-1).gather(1, source_index)  # (B, T)
    picked = logits.reshape(b, t * v).gather(1, source_index * v + input_ids)  # logits[b, src[j], ids[j]]
    token_logps = picked - lse
    return torch.cat([(token_logps * chosen_mask).sum(-1), (token_logps * rejected_mask).sum(-1)])


def response_lengths(loss_mask: Tensor) -> Tensor:
    """Number of scored tokens per sequence, (N,), matching `sequence_logps`."""
    return loss_mask[:, 1:].sum(-1)


def _margin(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    """h = (pc - rc) - (pr - rr); the reference is detached here, so no gradient
    reaches it even if a caller forgot torch.no_grad()."""
    return (pc - rc.detach()) - (pr - rr.detach())


def _rewards(beta: float, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def sigmoid_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, Eq. 7); with label_smoothing eps, cDPO:
    ``-(1-eps) log s(beta h) - eps log s(-beta h)``."""
    h = _margin(pc, pr, rc, rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return (losses, *_rewards(beta, pc, pr, rc, rr))


def robust_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, label_smoothing: float = 0.0):
    """Robust DPO (Chowdhury et al. 2024, Eq. 6): unbiased under label noise eps,
    ``[-(1-eps) log s(beta h) + eps log s(-beta h)] / (1 - 2 eps)``."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h = _margin(pc, pr, rc, rr)
    losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
        1 - 2 * label_smoothing
    )
    return (losses, *_rewards(beta, pc, pr, rc, rr))


def hinge_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float):
    """SLiC-style hinge: ``max(0, 1 - beta h)``."""
    h = _margin(pc, pr, rc, rr)
    return (torch.relu(1 - beta * h), *_rewards(beta, pc, pr, rc, rr))


def ipo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float):
    """IPO (Azar et al. 2023, Eq. 17): ``(h - 1/(2 beta))^2`` with beta as tau.

    Pass **length-averaged** log-probs (sum / response length), as the IPO
    authors' results and TRL do, so the square does not grow with length."""
    h = _margin(pc, pr, rc, rr)
    return ((h - 1 / (2 * beta)) ** 2, *_rewards(beta, pc, pr, rc, rr))


def simpo_loss(pc_avg: Tensor, pr_avg: Tensor, beta: float, gamma_beta_ratio: float, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, Eq. 6), reference-free and length-normalised:
    ``-log s(beta (pc_avg - pr_avg) - gamma)`` with ``gamma = gamma_beta_ratio * beta``.
    Takes **length-averaged** policy log-probs; rewards are ``beta * avg logp``."""
    h = pc_avg - pr_avg - gamma_beta_ratio
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, (beta * pc_avg).detach(), (beta * pr_avg).detach()


def nll_loss(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Token-mean NLL of the chosen responses over the batch, a scalar: the SFT
    term RPO (Pang et al. 2024) adds to DPO with weight alpha. The one batch-level
    reduction in this module, by definition of the term (as TRL's "sft" loss)."""
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: fn(pc, pr, [rc, rr,] beta, **options) -> (losses, chosen rewards, rejected rewards)."""

    fn: Callable
    needs_reference: bool = True  # False: fn takes no reference log-probs (and no reference model is loaded)
    length_normalised: bool = False  # True: fn takes per-token mean log-probs instead of sums
    options: dict[str, str] = field(default_factory=dict)  # fn keyword -> LossSettings field


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, options={"label_smoothing": "label_smoothing"}),
    "robust": LossSpec(robust_loss, options={"label_smoothing": "label_smoothing"}),
    "hinge": LossSpec(hinge_loss),
    "ipo": LossSpec(ipo_loss, length_normalised=True),
    "simpo": LossSpec(simpo_loss, needs_reference=False, length_normalised=True,
                      options={"gamma_beta_ratio": "simpo_gamma_beta_ratio", "label_smoothing": "label_smoothing"}),
}


@dataclass(frozen=True)
class LossSettings:
    """The loss a DPO step uses (from trainer.*): a `LOSSES` name and its hyper-parameters."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma_beta_ratio: float = 0.5
    rpo_alpha: float = 0.0  # weight of the chosen-response NLL term (0: off)

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.loss]

    @property
    def needs_reference(self) -> bool:
        return self.spec.needs_reference

    def options(self) -> dict[str, float]:
        return {arg: getattr(self, name) for arg, name in self.spec.options.items()}
