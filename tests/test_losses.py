"""Golden values and identities for renio_core.formulas.losses.

Goldens are written as closed forms of explicit probabilities (math.log of fractions) or
computed with plain Python loops over those probabilities; never from the code's output.
"""

from __future__ import annotations

import math

import pytest
import torch

from renio_core.formulas.losses import (
    sampled_reverse_kl,
    token_divergence,
    topk_divergence,
    weighted_loss,
)

LN2 = math.log(2.0)


def _logits_for(probs, temperature=1.0):
    """Logits whose softmax at ``temperature`` is exactly ``probs``."""
    return torch.tensor([[[temperature * math.log(p) for p in probs]]], dtype=torch.float64)


# Teacher (1/2, 1/4, 1/4), student (1/4, 1/2, 1/4).
P_T = [0.5, 0.25, 0.25]
P_S = [0.25, 0.5, 0.25]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_beta0_is_forward_kl_by_hand(temperature):
    s = _logits_for(P_S, temperature)
    t = _logits_for(P_T, temperature)
    # KL(T||S) = 1/2 ln(1/2 / 1/4) + 1/4 ln(1/4 / 1/2) + 0 = ln2/2 - ln2/4 = ln2/4
    got = token_divergence(s, t, beta=0.0, temperature=temperature, token_clip=0.0)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(LN2 / 4, abs=1e-6)
    # Clipped per entry to [0, 0.05]: 0.3466 -> 0.05, -0.1733 -> 0, 0 -> 0.
    got = token_divergence(s, t, beta=0.0, temperature=temperature, token_clip=0.05)
    assert got.item() == pytest.approx(0.05, abs=1e-6)


def test_beta1_is_reverse_kl_by_hand():
    s = _logits_for([0.2, 0.5, 0.3])
    t = _logits_for([0.7, 0.2, 0.1])
    # KL(S||T) = 0.2 ln(0.2/0.7) + 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.1)
    terms = [0.2 * math.log(0.2 / 0.7), 0.5 * math.log(0.5 / 0.2), 0.3 * math.log(0.3 / 0.1)]
    got = token_divergence(s, t, beta=1.0, temperature=1.0, token_clip=0.0)
    assert got.item() == pytest.approx(sum(terms), abs=1e-6)
    clipped = sum(min(max(x, 0.0), 0.3) for x in terms)  # 0 + 0.3 + 0.3
    assert clipped == pytest.approx(0.6)
    got = token_divergence(s, t, beta=1.0, temperature=1.0, token_clip=0.3)
    assert got.item() == pytest.approx(0.6, abs=1e-6)
    # And beta 0 is the other direction on the same pair.
    kl_ts = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.1 * math.log(0.1 / 0.3)
    got = token_divergence(s, t, beta=0.0, temperature=1.0, token_clip=0.0)
    assert got.item() == pytest.approx(kl_ts, abs=1e-6)


def test_beta_half_by_hand():
    s = _logits_for(P_S)
    t = _logits_for(P_T)
    # M = (3/8, 3/8, 1/4). Entry 0: 1/2 [1/2 ln(4/3)] + 1/2 [1/4 ln(2/3)]; entry 1 the same
    # by symmetry; entry 2: 0.
    entry = 0.5 * (0.5 * math.log(4 / 3)) + 0.5 * (0.25 * math.log(2 / 3))
    got = token_divergence(s, t, beta=0.5, temperature=1.0, token_clip=0.0)
    assert got.item() == pytest.approx(2 * entry, abs=1e-6)
    assert 2 * entry == pytest.approx(0.0424748, abs=1e-6)
    got = token_divergence(s, t, beta=0.5, temperature=1.0, token_clip=0.02)
    assert got.item() == pytest.approx(0.04, abs=1e-6)  # each entry 0.0212 -> 0.02


def test_beta_0_3_against_python_loop():
    ps = [0.1, 0.6, 0.2, 0.1]
    pt = [0.4, 0.1, 0.3, 0.2]
    beta = 0.3
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    terms = [
        beta * a * math.log(a / c) + (1 - beta) * b * math.log(b / c)
        for a, b, c in zip(pt, ps, m)
    ]
    got = token_divergence(_logits_for(ps), _logits_for(pt), beta, 1.0, 0.0)
    assert got.item() == pytest.approx(sum(terms), abs=1e-6)
    got = token_divergence(_logits_for(ps), _logits_for(pt), beta, 1.0, 0.01)
    assert got.item() == pytest.approx(sum(min(max(x, 0), 0.01) for x in terms), abs=1e-6)


def test_logit_shift_and_identity():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 7)
    for beta in (0.0, 0.5, 1.0):
        same = token_divergence(s, s + 3.0, beta, 1.3, 0.0)  # a constant shift is the same dist
        assert torch.allclose(same, torch.zeros(2, 3), atol=1e-6)


def test_forward_kl_gradient_is_p_student_minus_p_teacher():
    s = _logits_for(P_S).float().requires_grad_(True)
    t = _logits_for(P_T).float()
    token_divergence(s, t, 0.0, 1.0, 0.0).sum().backward()
    want = [a - b for a, b in zip(P_S, P_T)]
    assert s.grad[0, 0].tolist() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_with_full_support_equals_full_vocabulary(dtype):
    torch.manual_seed(1)
    V = 6
    s = torch.randn(2, 4, V, dtype=dtype)
    t = torch.randn(2, 4, V, dtype=dtype)
    temperature = 1.1
    t_logp = torch.log_softmax(t / temperature, dim=-1)
    ids = torch.argsort(t_logp, dim=-1, descending=True)
    topk_lp = t_logp.gather(-1, ids)
    for beta in (0.0, 0.5, 1.0):
        for clip in (0.0, 0.05):
            full = token_divergence(s, t, beta, temperature, clip)
            for tail in (True, False):
                got = topk_divergence(s, ids, topk_lp, beta, temperature, clip, tail=tail)
                assert torch.allclose(got.double(), full.double(), atol=1e-5), (beta, clip, tail)
    # The tail bucket of an empty tail has gradient 0, not NaN.
    s_req = s.clone().requires_grad_(True)
    topk_divergence(s_req, ids, topk_lp, 1.0, temperature, 0.0, tail=True).sum().backward()
    assert torch.isfinite(s_req.grad).all()


def test_topk_tail_and_renormalized_by_hand():
    # Teacher (1/2, 1/4, 1/4) keeps only id 0 (p 1/2): tail 1/2.
    # Student (1/4, 1/2, 1/4): id 0 has 1/4, tail 3/4.
    s = _logits_for(P_S)
    ids = torch.tensor([[[0]]])
    lp = torch.tensor([[[math.log(0.5)]]])
    got = topk_divergence(s, ids, lp, 0.0, 1.0, 0.0, tail=True)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert got.item() == pytest.approx(want, abs=1e-6)
    # Top-2 ids (0, 1) renormalized: teacher (2/3, 1/3), student (1/3, 2/3).
    ids = torch.tensor([[[0, 1]]])
    lp = torch.tensor([[[math.log(0.5), math.log(0.25)]]])
    got = topk_divergence(s, ids, lp, 0.0, 1.0, 0.0, tail=False)
    want = (2 / 3) * math.log(2) + (1 / 3) * math.log(0.5)
    assert got.item() == pytest.approx(want, abs=1e-6)
    # With the tail: teacher (1/2, 1/4, 1/4), student (1/4, 1/2, 1/4) -> ln2/4 again.
    got = topk_divergence(s, ids, lp, 0.0, 1.0, 0.0, tail=True)
    assert got.item() == pytest.approx(LN2 / 4, abs=1e-6)


def test_sampled_reverse_kl_gradient_is_policy_gradient():
    torch.manual_seed(2)
    z = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 4, 2], [1, 1, 3]])
    q = torch.log(torch.tensor([[0.1, 0.3, 0.2], [0.5, 0.05, 0.25]], dtype=torch.float64))
    s = torch.log_softmax(z, dim=-1).gather(-1, y[..., None])[..., 0]
    value = sampled_reverse_kl(s, q)
    # Value: -(q - s) * s with the advantage held fixed.
    assert torch.allclose(value, -(q - s.detach()) * s.detach())
    value.sum().backward()
    # Analytic: d/dz [(s - q) log pi(y)] with (s - q) constant = (s - q) (onehot(y) - softmax(z)).
    p = torch.softmax(z.detach(), dim=-1)
    onehot = torch.nn.functional.one_hot(y, 5).double()
    want = (s.detach() - q)[..., None] * (onehot - p)
    assert torch.allclose(z.grad, want, atol=1e-10)


def test_weighted_loss_by_hand():
    per_token = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    weights = torch.tensor([0.5, 2.0])
    # Sample 0: mean(1, 3) = 2, weight 0.5 -> 1. Sample 1: 2, weight 2 -> 4. Mean: 2.5.
    assert weighted_loss(per_token, mask, weights).item() == pytest.approx(2.5)


def test_all_masked_gives_zero_not_nan():
    per_token = torch.full((2, 3), float("nan"), requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = weighted_loss(per_token, mask, torch.ones(2))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(per_token.grad, torch.zeros(2, 3))
    # One sample masked out entirely, the other not: the empty one contributes 0.
    per_token = torch.tensor([[5.0, 5.0], [1.0, 3.0]])
    mask = torch.tensor([[0, 0], [1, 1]], dtype=torch.bool)
    assert weighted_loss(per_token, mask, torch.ones(2)).item() == pytest.approx(1.0)
    # Empty batch.
    assert weighted_loss(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), torch.zeros(0)).item() == 0.0


def _grads_for_weights(weights):
    torch.manual_seed(3)
    theta = torch.randn(5, requires_grad=False)
    theta = theta.clone().requires_grad_(True)
    x = torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5], [0.3, -0.2, 1.0, 1.0, 2.0]])
    # Per-token losses of two samples, 2 tokens each, depending on theta differently.
    per_token = torch.stack(
        [torch.stack([(theta * x[0]).sum() ** 2, (theta * x[0]).sin().sum()]),
         torch.stack([(theta * x[1]).cos().sum(), (theta * x[1]).sum() ** 2])]
    )
    mask = torch.ones(2, 2, dtype=torch.bool)
    weighted_loss(per_token, mask, torch.tensor(weights)).backward()
    return theta.grad.clone()


def test_weight_scales_the_sample_gradient():
    g11 = _grads_for_weights([1.0, 1.0])
    g21 = _grads_for_weights([2.0, 1.0])
    g01 = _grads_for_weights([0.0, 1.0])
    g10 = _grads_for_weights([1.0, 0.0])
    # Sample 0's contribution at weight 1 is g11 - g01 = g10; doubling doubles it.
    assert torch.allclose(g21 - g01, 2 * (g11 - g01), atol=1e-6)
    assert torch.allclose(g11 - g01, g10, atol=1e-6)
    # Weight 0 removes it: what is left is sample 1 alone.
    assert torch.allclose(g01, g11 - g10, atol=1e-6)


def test_bad_arguments():
    s = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match="beta"):
        token_divergence(s, s, 1.5, 1.0, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(s, s, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        token_divergence(s, torch.zeros(1, 1, 4), 0.0, 1.0, 0.0)
