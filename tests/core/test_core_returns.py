"""Discounted returns and GAE: hand values, reductions, vectorised == loop."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import discounted_returns, discounted_returns_loop, gae, gae_loop

EXACT = dict(atol=1e-6, rtol=0)
BIG = 1e6


def test_discounted_returns_hand_terminal():
    # gamma = 0.5, r = [1, 2, 3] (then padding)
    # G2 = 3; G1 = 2 + 0.5 * 3 = 3.5; G0 = 1 + 0.5 * 3.5 = 2.75
    r = torch.tensor([[1.0, 2.0, 3.0, BIG]])
    m = torch.tensor([[1, 1, 1, 0]])
    expected = torch.tensor([[2.75, 3.5, 3.0, 0.0]])
    assert_close(discounted_returns(r, m, 0.5), expected, **EXACT)
    assert_close(discounted_returns_loop(r, m, 0.5), expected, **EXACT)


def test_discounted_returns_hand_bootstrapped():
    # Cut by a time limit, V(s_after_last) = 8: G2 = 3 + 0.5 * 8 = 7; G1 = 2 + 3.5 = 5.5; G0 = 1 + 2.75 = 3.75
    r = torch.tensor([[1.0, 2.0, 3.0, BIG]])
    m = torch.tensor([[1, 1, 1, 0]])
    v = torch.tensor([8.0])
    expected = torch.tensor([[3.75, 5.5, 7.0, 0.0]])
    assert_close(discounted_returns(r, m, 0.5, v), expected, **EXACT)
    assert_close(discounted_returns_loop(r, m, 0.5, v), expected, **EXACT)


def test_discounted_returns_gamma_one_is_reward_to_go():
    # gamma = 1: G_t = sum_{s>=t} r_s: [1+2+3, 2+3, 3]
    r = torch.tensor([[1.0, 2.0, 3.0]])
    assert_close(discounted_returns(r, torch.ones(1, 3), 1.0), torch.tensor([[6.0, 5.0, 3.0]]), **EXACT)


def test_discounted_returns_length_one():
    # one real step: G0 = r0 (+ gamma V)
    r = torch.tensor([[2.0, BIG, BIG]])
    m = torch.tensor([[1, 0, 0]])
    assert_close(discounted_returns(r, m, 0.9), torch.tensor([[2.0, 0.0, 0.0]]), **EXACT)
    # 2 + 0.9 * 10 = 11
    assert_close(discounted_returns(r, m, 0.9, torch.tensor([10.0])), torch.tensor([[11.0, 0.0, 0.0]]), **EXACT)


def test_gae_hand_terminal():
    # gamma 0.9, lam 0.8, r = [0, 1], V = [0.5, 1.0], terminal (V after last = 0)
    # delta1 = 1 + 0.9 * 0 - 1.0 = 0;  delta0 = 0 + 0.9 * 1.0 - 0.5 = 0.4
    # A1 = 0;  A0 = 0.4 + 0.9 * 0.8 * 0 = 0.4;  returns = A + V = [0.9, 1.0]
    r = torch.tensor([[0.0, 1.0, BIG]])
    v = torch.tensor([[0.5, 1.0, BIG]])
    m = torch.tensor([[1, 1, 0]])
    for fn in (gae, gae_loop):
        adv, ret = fn(r, v, m, 0.9, 0.8)
        assert_close(adv, torch.tensor([[0.4, 0.0, 0.0]]), **EXACT)
        assert_close(ret, torch.tensor([[0.9, 1.0, 0.0]]), **EXACT)


def test_gae_hand_bootstrapped():
    # Same, but cut by a time limit with V(s_after_last) = 2:
    # delta1 = 1 + 0.9 * 2 - 1 = 1.8;  delta0 = 0.4
    # A1 = 1.8;  A0 = 0.4 + 0.72 * 1.8 = 1.696;  returns = [1.696 + 0.5, 1.8 + 1.0] = [2.196, 2.8]
    r = torch.tensor([[0.0, 1.0, BIG]])
    v = torch.tensor([[0.5, 1.0, BIG]])
    m = torch.tensor([[1, 1, 0]])
    for fn in (gae, gae_loop):
        adv, ret = fn(r, v, m, 0.9, 0.8, torch.tensor([2.0]))
        assert_close(adv, torch.tensor([[1.696, 1.8, 0.0]]), **EXACT)
        assert_close(ret, torch.tensor([[2.196, 2.8, 0.0]]), **EXACT)


def test_gae_full_length_rows_bootstrap_from_last_values():
    # A row that fills T: V after the last step comes from last_values.
    # r = [1], V = [3], gamma 0.5, boot 4: delta = 1 + 2 - 3 = 0 -> A = 0, returns = 3
    adv, ret = gae(torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.5, 0.9, torch.tensor([4.0]))
    assert_close(adv, torch.tensor([[0.0]]), **EXACT)
    assert_close(ret, torch.tensor([[3.0]]), **EXACT)


def test_gae_reduces_to_returns_minus_values_when_lambda_is_one():
    # lam = 1: A_t = G_t - V_t (the V terms telescope)
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    m = (torch.arange(5)[None] < torch.tensor([[5], [2], [1]])).double()
    adv, _ = gae(r, v, m, 0.9, 1.0)
    assert_close(adv, (discounted_returns(r, m, 0.9) - v) * m, atol=1e-12, rtol=0)


def test_gae_reduces_to_td_error_when_lambda_is_zero():
    # lam = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t (V after the last real token = 0)
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[0.5, 1.5, 2.5]])
    # [1 + 0.9*1.5 - 0.5, 2 + 0.9*2.5 - 1.5, 3 + 0 - 2.5] = [1.85, 2.75, 0.5]
    adv, _ = gae(r, v, torch.ones(1, 3), 0.9, 0.0)
    assert_close(adv, torch.tensor([[1.85, 2.75, 0.5]]), **EXACT)


def _random_batch(seed: int, n: int = 7, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[0] = t  # one full row
    lengths[1] = 1  # one length-1 row
    m = (torch.arange(t)[None] < lengths[:, None]).double()
    r = torch.randn(n, t, generator=g, dtype=torch.float64)
    v = torch.randn(n, t, generator=g, dtype=torch.float64)
    # the loop forms read only real positions; plant garbage in the padding of the vectorised inputs
    r_pad = torch.where(m.bool(), r, torch.full_like(r, BIG))
    v_pad = torch.where(m.bool(), v, torch.full_like(v, -BIG))
    last = torch.randn(n, generator=g, dtype=torch.float64)
    return r, v, m, r_pad, v_pad, last


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bootstrap", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.97])
def test_discounted_returns_vectorised_equals_loop(seed, bootstrap, gamma):
    r, _, m, r_pad, _, last = _random_batch(seed)
    lv = last if bootstrap else None
    assert_close(discounted_returns(r_pad, m, gamma, lv), discounted_returns_loop(r, m, gamma, lv), atol=1e-10, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bootstrap", [False, True])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.8, 0.0), (0.9, 1.0)])
def test_gae_vectorised_equals_loop(seed, bootstrap, gamma, lam):
    r, v, m, r_pad, v_pad, last = _random_batch(seed)
    lv = last if bootstrap else None
    adv, ret = gae(r_pad, v_pad, m, gamma, lam, lv)
    adv_ref, ret_ref = gae_loop(r, v, m, gamma, lam, lv)
    assert_close(adv, adv_ref, atol=1e-10, rtol=0)
    assert_close(ret, ret_ref, atol=1e-10, rtol=0)
