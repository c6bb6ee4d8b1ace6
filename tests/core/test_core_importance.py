"""Truncated importance sampling and the sampler/trainer log-prob mismatch, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import logprob_mismatch, truncated_importance_weights

F64 = torch.float64


def test_tis_weights_by_hand():
    # w = min(exp(old - sampler), C) with C = 2:
    #   old - sampler = log 0.5 -> 0.5;  0 -> 1;  log 1.5 -> 1.5;  log 3 -> min(3, 2) = 2;  +50 -> 2 (no overflow)
    sampler = torch.tensor([[math.log(0.4), -1.0, math.log(0.2), math.log(0.1), -60.0]], dtype=F64)
    old = sampler + torch.tensor([[math.log(0.5), 0.0, math.log(1.5), math.log(3.0), 50.0]], dtype=F64)
    w = truncated_importance_weights(old, sampler, cap=2.0)
    assert_close(w, torch.tensor([[0.5, 1.0, 1.5, 2.0, 2.0]]), atol=1e-6, rtol=0)
    assert not w.requires_grad


def test_tis_weights_carry_no_gradient_and_reduce_to_one_when_sampler_matches():
    old = torch.randn(3, 5, dtype=F64, requires_grad=True)
    w = truncated_importance_weights(old, old.detach().clone(), cap=1.5)
    assert not w.requires_grad
    assert_close(w, torch.ones(3, 5), atol=0, rtol=0)
    # a cap below 1 truncates even matching tokens: w = C everywhere
    assert_close(truncated_importance_weights(old, old.detach(), cap=0.25), torch.full((3, 5), 0.25), atol=1e-7, rtol=0)


def test_tis_multiplies_each_tokens_policy_gradient_loss():
    # the trainer's use: loss_t = w_t * L_t, so d loss / d logp_t = w_t * dL_t/dlogp_t
    from reinforcepp.core import policy_loss

    logp = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    old = logp.detach().clone()
    sampler = old - torch.tensor([[math.log(0.5), math.log(4.0)]], dtype=F64)  # ratios 0.5 and 4 -> w = 0.5, 3
    adv = torch.tensor([[1.0, -2.0]], dtype=F64)
    w = truncated_importance_weights(old, sampler, cap=3.0).to(F64)
    (w * policy_loss(logp, old, adv).loss).sum().backward()
    # on-policy ratio 1: dL/dlogp = -A, so the gradient is -A * w = [-0.5, 6]
    assert_close(logp.grad, torch.tensor([[-0.5, 6.0]], dtype=F64), atol=1e-12, rtol=0)


def test_tis_rejects_bad_cap_and_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(x, x, cap=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        truncated_importance_weights(x, torch.zeros(2, 4), cap=2.0)


def test_logprob_mismatch_by_hand_ignores_padding():
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 7.0, 9.0]])
    sampler = torch.tensor([[-1.1, -1.7, float("-inf")], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    mean, mx = logprob_mismatch(old, sampler, mask)
    # real tokens: |0.1|, |0.3|, |0| -> mean 0.4 / 3, max 0.3
    assert math.isclose(mean, 0.4 / 3, abs_tol=1e-7) and math.isclose(mx, 0.3, abs_tol=1e-7)
    assert logprob_mismatch(old, sampler, torch.zeros_like(mask)) == (0.0, 0.0)


def test_logprob_mismatch_mean_is_global_with_a_reduce_hook():
    # two "ranks" with 1 and 3 tokens: the global mean weighs tokens, not ranks
    a_old, a_s, a_m = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])
    b_old, b_s, b_m = torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3)
    parts = []

    def reduce_with(other):
        def reduce(sums):
            parts.append(sums)
            return sums + other
        return reduce

    other_b = torch.tensor([0.0, 3.0], dtype=F64)
    mean, _ = logprob_mismatch(a_old, a_s, a_m, reduce_with(other_b))
    assert math.isclose(mean, 1.0 / 4, abs_tol=1e-12)
    mean_b, mx_b = logprob_mismatch(b_old, b_s, b_m, reduce_with(torch.tensor([1.0, 1.0], dtype=F64)))
    assert math.isclose(mean_b, 1.0 / 4, abs_tol=1e-12) and mx_b == 0.0
