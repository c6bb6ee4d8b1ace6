"""Loss variants against hand-computed numbers: CISPO (MiniMax-M1), Clip-Cov and KL-Cov (Cui et
al. 2025, verl's clip_cov / kl_cov), and the on-policy distillation rewards."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import (
    categorical_kl,
    cispo_loss,
    clip_cov_loss,
    distillation_token_rewards,
    kl_cov_loss,
    policy_loss,
    token_covariance,
)

EXACT = {"atol": 1e-6, "rtol": 0}
LN2 = math.log(2.0)


# --- CISPO ----------------------------------------------------------------------------------------------------------


def test_cispo_weights_the_reinforce_term_by_the_clipped_detached_ratio():
    logp = torch.tensor([[math.log(0.5), LN2, 3 * LN2]], requires_grad=True)  # ratios 0.5, 2, 8 (old = 0)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    out = cispo_loss(logp, old, adv)  # defaults: no lower bound, upper bound 1 + 4 = 5
    # weights (0.5, 2, 5); L = -w A logp
    assert_close(out.loss.detach(), torch.tensor([[0.5 * LN2, 2 * LN2, -30 * LN2]]), **EXACT)
    out.loss.sum().backward()
    assert_close(logp.grad, torch.tensor([[-0.5, 2.0, -10.0]]), **EXACT)  # -w A: no token loses its gradient
    assert out.clipped_high.tolist() == [[False, False, True]] and not out.clipped_low.any()

    logp2 = logp.detach().clone().requires_grad_(True)
    out2 = cispo_loss(logp2, old, adv, eps_low=0.2, eps_high=0.28)
    out2.loss.sum().backward()
    assert_close(logp2.grad, torch.tensor([[-0.8, 1.28, -2.56]]), **EXACT)  # weights (0.8, 1.28, 1.28)
    assert out2.clipped_low.tolist() == [[True, False, False]] and out2.clipped_high.tolist() == [[False, True, True]]


def test_cispo_on_policy_gradient_is_reinforce_and_survives_where_ppo_drops_it():
    adv = torch.tensor([[1.5, -0.5]])
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    cispo_loss(logp, logp.detach(), adv).loss.sum().backward()
    assert_close(logp.grad, -adv, **EXACT)  # ratio 1: -A grad log pi, as the PPO loss on-policy
    # ratio e^0.5 > 1.2 with A > 0: PPO's clip zeroes the gradient, CISPO keeps w = e^0.5
    logp_ppo = torch.tensor([[0.5]], requires_grad=True)
    policy_loss(logp_ppo, torch.zeros(1, 1), torch.ones(1, 1)).loss.sum().backward()
    logp_cispo = torch.tensor([[0.5]], requires_grad=True)
    cispo_loss(logp_cispo, torch.zeros(1, 1), torch.ones(1, 1)).loss.sum().backward()
    assert logp_ppo.grad.item() == 0.0
    assert_close(logp_cispo.grad, torch.tensor([[-math.exp(0.5)]]), **EXACT)
    with pytest.raises(ValueError, match="eps_high"):
        cispo_loss(logp, logp.detach(), adv, eps_high=0.0)


# --- covariance, Clip-Cov, KL-Cov -----------------------------------------------------------------------------------

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
LOGP = torch.tensor([[0.0, -1.0, -3.0], [-2.0, -4.0, 7.0]])  # real mean -2; centred (2, 1, -1 | 0, -2)
ADV = torch.tensor([[1.5, 3.0, -2.0], [5.0, -1.0, 9.0]])  # real mean 1.3; centred (0.2, 1.7, -3.3 | 3.7, -2.3)
COV = torch.tensor([[0.4, 1.7, 3.3], [0.0, 4.6, 0.0]])


def test_token_covariance_by_hand():
    assert_close(token_covariance(LOGP, ADV, MASK), COV, **EXACT)


def test_clip_cov_detaches_the_eligible_tokens_and_skips_those_ppo_already_clips():
    logp = LOGP.clone().requires_grad_(True)
    old = LOGP.clone()
    old[1, 1] += 0.5  # ratio e^-0.5 < 0.8 with A = -1 < 0: PPO's lower clip binds, so (1, 1) is not eligible
    # eligible: 1 < Cov < 5, real, not PPO-clipped -> (0, 1) and (0, 2); clip_ratio 0.4 -> n = int(0.4 * 5) = 2: both
    out = clip_cov_loss(logp, old, ADV, MASK, clip_ratio=0.4, generator=torch.Generator().manual_seed(0))
    assert out.selected.tolist() == [[False, True, True], [False, False, False]]
    assert out.clipped_low.tolist() == [[False, False, False], [False, True, False]]
    ppo = policy_loss(logp, old, ADV)
    assert_close(out.loss.detach(), torch.where(out.selected, 0.0, ppo.loss.detach()), **EXACT)
    (out.loss * MASK).sum().backward()
    # gradient -A on the untouched on-policy tokens, 0 on the detached ones and on the PPO-clipped (1, 1)
    assert_close(logp.grad, torch.tensor([[-1.5, 0.0, 0.0], [-5.0, 0.0, 0.0]]), **EXACT)


def test_clip_cov_draws_with_the_generator():
    # on-policy: eligible (0, 1), (0, 2), (1, 1) in row-major order; n = max(int(2e-4 * 5), 1) = 1
    eligible = [(0, 1), (0, 2), (1, 1)]
    picks = set()
    for seed in range(8):
        out = clip_cov_loss(LOGP, LOGP, ADV, MASK, generator=torch.Generator().manual_seed(seed))
        expected = eligible[int(torch.randperm(3, generator=torch.Generator().manual_seed(seed))[0])]
        chosen = [tuple(ix) for ix in torch.nonzero(out.selected).tolist()]
        assert chosen == [expected]
        again = clip_cov_loss(LOGP, LOGP, ADV, MASK, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again.selected, out.selected)
        picks.add(expected)
    assert len(picks) > 1  # the draw does depend on the seed
    # more requested than eligible: all three; a narrower band (2, 5): only (0, 2) and (1, 1)
    assert clip_cov_loss(LOGP, LOGP, ADV, MASK, clip_ratio=1.0).selected.sum() == 3
    narrow = clip_cov_loss(LOGP, LOGP, ADV, MASK, clip_ratio=1.0, cov_lb=2.0)
    assert narrow.selected.tolist() == [[False, False, True], [False, True, False]]


def test_kl_cov_penalises_the_top_covariance_tokens_without_a_clip():
    logp = LOGP.clone().requires_grad_(True)
    old = LOGP - 0.1  # log ratio 0.1 everywhere: r = e^0.1, |log r| = 0.1
    out = kl_cov_loss(logp, old, ADV, MASK, kl_ratio=0.4, kl_coef=2.0)  # n = 2: Cov 4.6 at (1, 1) and 3.3 at (0, 2)
    assert out.selected.tolist() == [[False, False, True], [False, True, False]]
    r = math.exp(0.1)
    expected = -ADV * r + torch.where(out.selected, 2.0 * 0.1, 0.0)
    assert_close(out.loss.detach(), expected, **EXACT)
    (out.loss * MASK).sum().backward()
    # d/dlogp: -A r, plus kl_coef * sign(log r) = 2 on the selected tokens
    assert_close(logp.grad, (-ADV * r + torch.where(out.selected, 2.0, 0.0)) * MASK, **EXACT)
    # default ratio 2e-4: one token, the largest covariance; no clip even far off-policy
    far = kl_cov_loss(LOGP, LOGP - 1.0, ADV, MASK)
    assert far.selected.tolist() == [[False, False, False], [False, True, False]]
    assert_close(far.loss[0, 0], torch.tensor(-1.5 * math.e), **EXACT)  # PPO would clip r = e to 1.2
    assert not far.clipped_low.any() and not far.clipped_high.any()


# --- on-policy distillation rewards ------------------------------------------------------------------------------


def test_distillation_rewards_by_hand_and_zero_on_padding():
    logp = torch.tensor([[-1.0, -2.0, 1e6]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0, float("nan")]])
    r = distillation_token_rewards(logp, teacher, torch.tensor([[1, 1, 0]]))
    assert_close(r, torch.tensor([[0.5, -1.0, 0.0]]), atol=0, rtol=0)
    assert not r.requires_grad and r.dtype == torch.float32


def test_distillation_rewards_average_to_minus_the_reverse_kl():
    """E_{a ~ student}[r(a)] = -KL(student || teacher), exactly, on a categorical."""
    student_logits = torch.tensor([0.3, -1.0, 0.8, 0.0], dtype=torch.float64)
    teacher_logits = torch.tensor([1.0, 0.2, -0.5, 0.1], dtype=torch.float64)
    s, t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    r = distillation_token_rewards(s[None], t[None], torch.ones(1, 4))[0].double()
    assert_close((s.exp() * r).sum(), -categorical_kl(student_logits, teacher_logits), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="shapes differ"):
        distillation_token_rewards(s[None], t[None, :3], torch.ones(1, 4))
