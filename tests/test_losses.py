"""Losses against hand-worked values, and their invariants."""

import math

import pytest
import torch

from raydpo.losses import (
    LOSSES,
    hinge_loss,
    ipo_loss,
    nll_loss,
    response_lengths,
    robust_loss,
    sequence_logps,
    shared_prefix_logps,
    sigmoid_loss,
    simpo_loss,
)

T = torch.tensor
# One pair used throughout: pc=-1, pr=-3, rc=-2, rr=-2, so
#   h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 1 - (-1) = 2.
PC, PR, RC, RR = T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0])
SP1 = math.log1p(math.exp(-1))  # -log sigmoid(1) = softplus(-1) = 0.3132616875
SPM1 = math.log1p(math.exp(1))  # -log sigmoid(-1) = softplus(1) = 1.3132616875


def test_sequence_logps_literal_shift_and_padding():
    """V = 2, T = 3.  Row 0: ids [0, 1, 0], mask [0, 1, 1].
    Token 1 (id 1) is scored with the logits at t=0: [0, ln 3] -> p = 3/4.
    Token 2 (id 0) is scored with the logits at t=1: [ln 2, 0] -> p = 2/3.
    The logits at t=2 predict past the end and are never used.
    logp = ln(3/4) + ln(2/3) = ln(1/2).
    Row 1: same, but token 2 is padding (mask 0): logp = ln(3/4)."""
    logits = T([[[0.0, math.log(3)], [math.log(2), 0.0], [100.0, -100.0]]] * 2)
    ids = T([[0, 1, 0], [0, 1, 0]])
    mask = T([[0, 1, 1], [0, 1, 0]])
    got = sequence_logps(logits, ids, mask)
    assert got.tolist() == pytest.approx([math.log(0.5), math.log(0.75)], abs=1e-6)
    assert response_lengths(mask).tolist() == [2, 1]
    # a mask on position 0 changes nothing: nothing predicts the first token
    assert sequence_logps(logits, ids, T([[1, 1, 1], [1, 1, 0]])).tolist() == pytest.approx(got.tolist())


def test_shared_prefix_logps_hand_worked():
    """V = 2. One row: prompt [0], chosen [1], rejected [1] -> ids [0, 1, 1].
    logits at t=0 [0, ln 3] predict both responses' first token: p(1) = 3/4.
    The rejected token at j=2 is scored with the logits at source_index 0, not
    at t=1 (which would give p(1) = 1/3 from [ln 2, 0]).
    chosen = rejected = ln(3/4)."""
    logits = T([[[0.0, math.log(3)], [math.log(2), 0.0], [100.0, -100.0]]])
    got = shared_prefix_logps(logits, T([[0, 1, 1]]), T([[0, 0, 0]]), T([[0, 1, 0]]), T([[0, 0, 1]]))
    assert got.tolist() == pytest.approx([math.log(0.75), math.log(0.75)], abs=1e-6)
    shifted = shared_prefix_logps(logits, T([[0, 1, 1]]), T([[0, 0, 1]]), T([[0, 1, 0]]), T([[0, 0, 1]]))
    assert shifted[1].item() == pytest.approx(math.log(1 / 3), abs=1e-6)


def test_sequence_logps_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    mask = (torch.rand(3, 7) > 0.3).long()
    ref = (torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)
    assert torch.allclose(sequence_logps(logits, ids, mask), ref, atol=1e-5)


def test_sigmoid_hand_worked():
    """beta = 0.5: beta*h = 1, loss = -log sigmoid(1) = 0.31326;
    rewards beta*(pc-rc) = 0.5, beta*(pr-rr) = -0.5."""
    loss, cr, rr = sigmoid_loss(PC, PR, RC, RR, beta=0.5)
    assert loss.item() == pytest.approx(SP1, abs=1e-7)
    assert (cr.item(), rr.item()) == (0.5, -0.5)


def test_cdpo_hand_worked():
    """eps = 0.1: 0.9 * softplus(-1) + 0.1 * softplus(1) = 0.28193552 + 0.13132617 = 0.41326169."""
    loss, _, _ = sigmoid_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * SP1 + 0.1 * SPM1, abs=1e-7)
    assert loss.item() == pytest.approx(0.41326169, abs=1e-7)


def test_robust_hand_worked():
    """eps = 0.1: (0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8 = (0.28193552 - 0.13132617) / 0.8 = 0.18826169."""
    loss, _, _ = robust_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.18826169, abs=1e-7)
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        robust_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.5)


def test_hinge_hand_worked():
    """beta = 0.5: max(0, 1 - 1) = 0.  beta = 0.25: max(0, 1 - 0.5) = 0.5."""
    assert hinge_loss(PC, PR, RC, RR, beta=0.5)[0].item() == 0.0
    assert hinge_loss(PC, PR, RC, RR, beta=0.25)[0].item() == 0.5


def test_ipo_hand_worked():
    """beta (tau) = 0.5: target margin 1/(2*0.5) = 1; (h - 1)^2 = (2 - 1)^2 = 1.
    beta = 0.25: target 2, (2 - 2)^2 = 0."""
    assert ipo_loss(PC, PR, RC, RR, beta=0.5)[0].item() == pytest.approx(1.0)
    assert ipo_loss(PC, PR, RC, RR, beta=0.25)[0].item() == pytest.approx(0.0)


def test_simpo_hand_worked():
    """avg logps -1 and -2, beta = 2, gamma/beta = 0.5: beta * (1 - 0.5) = 1,
    loss = softplus(-1) = 0.31326; rewards 2 * -1 = -2, 2 * -2 = -4."""
    loss, cr, rr = simpo_loss(T([-1.0]), T([-2.0]), beta=2.0, gamma_beta_ratio=0.5)
    assert loss.item() == pytest.approx(SP1, abs=1e-7)
    assert (cr.item(), rr.item()) == (-2.0, -4.0)


def test_nll_hand_worked():
    """Token mean over the batch: sums -6 (3 tokens) and -2 (1 token) give
    (6 + 2) / (3 + 1) = 2.  Sums -9 (1 token) and -1 (4 tokens) give 10 / 5 = 2,
    where a mean of per-pair means would give (9 + 0.25) / 2 = 4.625."""
    assert nll_loss(T([-6.0, -2.0]), T([3, 1])).item() == 2.0
    assert nll_loss(T([-9.0, -1.0]), T([1, 4])).item() == 2.0


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_policy_equal_reference_gives_ln2(beta, eps):
    x = torch.randn(5)
    for fn in (sigmoid_loss, robust_loss):
        loss, cr, rr = fn(x, x - 1, x, x - 1, beta=beta, label_smoothing=eps)
        assert torch.allclose(loss, torch.full((5,), math.log(2)), atol=1e-6)
        assert torch.all(cr == 0) and torch.all(rr == 0)


def test_label_smoothing_half_carries_no_preference():
    """eps = 0.5: L(h) = 0.5 (softplus(-beta h) + softplus(beta h)) is even in h,
    so swapping chosen and rejected gives the same loss: the labels carry no
    signal, the only pull is toward h = 0, where the loss is ln 2."""
    pc, pr, rc, rr = torch.randn(4, 8).unbind(0)
    a, _, _ = sigmoid_loss(pc, pr, rc, rr, beta=0.7, label_smoothing=0.5)
    b, _, _ = sigmoid_loss(pr, pc, rr, rc, beta=0.7, label_smoothing=0.5)
    assert torch.allclose(a, b, atol=1e-6)
    z, _, _ = sigmoid_loss(pc, pc, rc, rc, beta=0.7, label_smoothing=0.5)
    assert torch.allclose(z, torch.full_like(z, math.log(2)))


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "ipo"])
def test_no_gradient_into_reference(name):
    pc, pr, rc, rr = (torch.randn(3, requires_grad=True) for _ in range(4))
    loss, _, _ = LOSSES[name].fn(pc, pr, rc, rr, beta=0.1)
    loss.sum().backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad is not None and torch.any(pc.grad != 0)


def test_finite_at_extreme_logits():
    logits = torch.full((2, 4, 5), -1e4)
    logits[:, :, 0] = 1e4
    logits.requires_grad_(True)
    ids = T([[0, 1, 2, 0], [0, 0, 0, 0]])
    mask = T([[0, 1, 1, 1], [0, 1, 1, 1]])
    lp = sequence_logps(logits, ids, mask)
    assert torch.isfinite(lp).all() and lp[1].item() == 0.0 and lp[0].item() == pytest.approx(-4e4)
    pc, pr = lp[:1], lp[1:]
    for name in ("sigmoid", "robust", "hinge", "ipo"):
        loss, _, _ = LOSSES[name].fn(pc, pr, torch.zeros(1), torch.zeros(1), beta=0.1, **({"label_smoothing": 0.1} if name in ("sigmoid", "robust") else {}))
        assert torch.isfinite(loss).all(), name
    loss, _, _ = sigmoid_loss(pc, pr, torch.zeros(1), torch.zeros(1), beta=0.1)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    s, _, _ = simpo_loss(T([1e4]), T([-1e4]), beta=2.0, gamma_beta_ratio=0.5)
    assert torch.isfinite(s).all()
