"""Loss options practitioners adopted since 2025, each against hand-computed numbers and the
anchor it matches: GSPO's sequence-level ratio, verl's k3+ KL, TRL's mask_truncated_completions,
reference refresh (TRL's sync_ref_model), TRL's scale_rewards, unbiased pass@k."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import (
    aggregate,
    importance_log_ratio,
    kl_loss,
    mix_reference,
    pass_at_k,
    policy_loss,
    scaled_group_advantages,
    truncated_loss_mask,
)

EXACT = {"atol": 1e-6, "rtol": 0}


# --- k3+ (verl): the value of k3, the gradient of k2 ---------------------------------------------


def test_k3_plus_has_k3_value_and_k2_gradient():
    logp = torch.tensor([[0.5, -1.0]], requires_grad=True)
    ref = torch.zeros(1, 2)
    kl = kl_loss(logp, ref, "k3+")
    # value: exp(-x) - 1 + x with x = 0.5, -1.0
    assert_close(kl.detach(), torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0]]), **EXACT)
    kl.sum().backward()
    assert_close(logp.grad, torch.tensor([[0.5, -1.0]]), **EXACT)  # d(x^2 / 2)/dx = x
    # k3's own gradient differs: 1 - exp(-x)
    logp3 = logp.detach().clone().requires_grad_(True)
    kl_loss(logp3, ref, "k3").sum().backward()
    assert_close(logp3.grad, torch.tensor([[1 - math.exp(-0.5), 1 - math.e]]), **EXACT)


# --- GSPO: sequence-level importance ratio ----------------------------------------------------


LOGP_MINUS_OLD = torch.tensor([[0.2, -0.1, 0.5], [0.3, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_sequence_ratio_values_hand_computed():
    logp = LOGP_MINUS_OLD.clone().requires_grad_(True)
    old = torch.zeros(2, 3)
    log_r = importance_log_ratio(logp, old, MASK, "sequence")
    # s_1 = (0.2 - 0.1) / 2 = 0.05 on every token of response 1; s_2 = 0.3 / 1 on response 2
    assert_close(log_r.detach() * MASK, torch.tensor([[0.05, 0.05, 0.0], [0.3, 0.0, 0.0]]), **EXACT)
    assert_close(importance_log_ratio(logp, old, MASK, "token").detach(), LOGP_MINUS_OLD, **EXACT)

    adv = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    pl = policy_loss(logp, old, adv, 0.2, 0.2, response_mask=MASK, importance_sampling_level="sequence")
    # response 1: ratio e^0.05 = 1.0512711 inside [0.8, 1.2]: L = -1.0512711 per token;
    # response 2: ratio e^0.3 = 1.3498588 > 1.2 with A > 0: clipped, L = -1.2, no gradient
    assert_close(pl.loss * MASK, torch.tensor([[-math.exp(0.05)] * 2 + [0.0], [-1.2, 0.0, 0.0]]), **EXACT)
    assert pl.clipped_high.tolist() == [[False, False, False], [True, True, True]]
    aggregate(pl.loss, MASK, "token-mean").backward()
    # dL/dlogp[0, t] = -A s_1 / 3 tokens (token-GSPO: the gradient of each token scaled by s_1)
    assert_close(logp.grad, torch.tensor([[-math.exp(0.05) / 3] * 2 + [0.0], [0.0, 0.0, 0.0]]), **EXACT)


def test_gspo_token_form_equals_trl_sequence_form_for_per_response_advantages():
    torch.manual_seed(0)
    delta = 0.05 * torch.randn(4, 5)
    mask = torch.tensor([[1.0] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    adv = torch.tensor([0.7, -1.3, 0.4, -0.2])[:, None].expand(4, 5)
    ours = delta.clone().requires_grad_(True)
    pl = policy_loss(ours, torch.zeros(4, 5), adv, 0.03, 0.04, response_mask=mask, importance_sampling_level="sequence")
    aggregate(pl.loss, mask, "token-mean").backward()
    # TRL: log w_i = sum_t m (logp - old) / |y_i| with the gradient through the mean, broadcast
    trl = delta.clone().requires_grad_(True)
    log_w = ((trl * mask).sum(-1) / mask.sum(-1))[:, None].expand(4, 5)
    w = torch.exp(log_w)
    loss = torch.maximum(-adv * w, -adv * w.clamp(1 - 0.03, 1 + 0.04))
    aggregate(loss, mask, "token-mean").backward()
    assert_close(pl.loss * mask, loss.detach() * mask, **EXACT)
    assert_close(ours.grad, trl.grad, atol=1e-7, rtol=0)


# --- mask_truncated_completions ----------------------------------------------------------------


def test_truncated_responses_leave_the_loss():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    truncated = torch.tensor([False, True, False])
    lm = truncated_loss_mask(mask, truncated)
    assert lm.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    per_token = torch.tensor([[1.0, 2.0, 9.0], [5.0, 5.0, 5.0], [3.0, 9.0, 9.0]])
    # token-mean over the kept tokens: (1 + 2 + 3) / 3 = 2 (TRL: completion_mask * is_eos)
    assert_close(aggregate(per_token * lm, mask, "token-mean", num_tokens=float(lm.sum())), torch.tensor(2.0), **EXACT)
    with pytest.raises(ValueError, match="does not match"):
        truncated_loss_mask(mask, truncated[:2])


# --- reference refresh -----------------------------------------------------------------------


def test_reference_refresh_mixes_in_the_policy():
    ref = [torch.tensor([0.0, 4.0]), torch.tensor([[1.0]])]
    pol = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    mix_reference(ref, pol, 0.6)  # TRL: alpha * policy + (1 - alpha) * ref
    assert_close(ref[0], torch.tensor([0.6, 2.8]), **EXACT)
    assert_close(ref[1], torch.tensor([[2.2]]), **EXACT)
    mix_reference(ref, pol, 1.0)
    assert_close(ref[0], pol[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="alpha"):
        mix_reference(ref, pol, 0.0)


# --- TRL's scale_rewards -------------------------------------------------------------------------


def test_scale_rewards_group_batch_none():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])  # two groups of 2: means 0.5 and 1
    assert_close(scaled_group_advantages(r, 2, "none"), torch.tensor([0.5, -0.5, 0.0, 0.0]), **EXACT)
    # group std (ddof 1) of [1, 0] = 1/sqrt(2): 0.5 * sqrt(2); the equal group gets 0
    expected = torch.tensor([0.5 * 2**0.5, -0.5 * 2**0.5, 0.0, 0.0])
    assert_close(scaled_group_advantages(r, 2, "group"), expected, atol=1e-5, rtol=0)
    # batch std (ddof 1) of [1, 0, 1, 1] = sqrt(0.75 / 3) = 0.5
    assert_close(scaled_group_advantages(r, 2, "batch"), torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_scale_rewards_batch_is_global_over_ranks():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0, 0.0])
    whole = scaled_group_advantages(r, 2, "batch")
    first, second = r[:4], r[4:]

    def stats(x):
        return torch.tensor([float(x.numel()), float(x.sum()), float(x.square().sum())], dtype=torch.float64)

    a = scaled_group_advantages(first, 2, "batch", reduce=lambda s: s + stats(second))
    b = scaled_group_advantages(second, 2, "batch", reduce=lambda s: s + stats(first))
    assert_close(torch.cat([a, b]), whole, **EXACT)


# --- unbiased pass@k ----------------------------------------------------------------------------


def test_pass_at_k_hand_computed():
    c = torch.tensor([0, 1, 2, 4, 5])
    # n = 5, k = 2: 1 - C(5 - c, 2) / C(5, 2) = 1 - [10, 6, 3, 0, 0] / 10
    assert_close(pass_at_k(5, c, 2), torch.tensor([0.0, 0.4, 0.7, 1.0, 1.0], dtype=torch.float64), **EXACT)
    assert_close(pass_at_k(5, c, 1), c.double() / 5, **EXACT)  # k = 1: c / n
    assert_close(pass_at_k(5, c, 5), (c > 0).double(), **EXACT)  # k = n: any of n
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(5, c, 6)
