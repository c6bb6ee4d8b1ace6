"""Metric helpers: clip fractions, approx_kl, advantage statistics (token- vs sample-weighted)."""

from __future__ import annotations

import math

import pytest
import torch

from reinforcepp.core import (
    AdvantageInputs,
    AdvantageParams,
    advantage_stats,
    approx_kl,
    clip_fractions,
    compute_advantages,
)

BIG = 1e6


def test_clip_fractions_hand():
    # 5 real tokens; the padded one (clipped on both sides) must not count
    # low: 2 / 5 = 0.4;  high: 1 / 5 = 0.2
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    low = torch.tensor([[True, False, False], [False, True, True]])
    high = torch.tensor([[False, True, False], [False, False, True]])
    lo, hi = clip_fractions(low, high, mask)
    assert isinstance(lo, float) and isinstance(hi, float)
    assert lo == pytest.approx(0.4, abs=1e-7) and hi == pytest.approx(0.2, abs=1e-7)


def test_approx_kl_is_zero_on_policy():
    logp = torch.randn(3, 4)
    assert approx_kl(logp, logp.clone(), torch.ones(3, 4)) == 0.0


def test_approx_kl_hand():
    # log r = logp - old = [ln 2, -ln 2]; k3 = (r - 1) - log r
    # r = 2: 1 - 0.6931472 = 0.3068528;  r = 1/2: -0.5 + 0.6931472 = 0.1931472;  mean = 0.25 exactly
    logp = torch.tensor([[math.log(2.0), -math.log(2.0), BIG]])
    old = torch.zeros(1, 3)
    assert approx_kl(logp, old, torch.tensor([[1, 1, 0]])) == pytest.approx(0.25, abs=1e-7)
    # always >= 0
    assert approx_kl(torch.randn(4, 5), torch.randn(4, 5), torch.ones(4, 5)) >= 0.0


def test_approx_kl_does_not_track_gradients():
    logp = torch.zeros(1, 2, requires_grad=True)
    assert isinstance(approx_kl(logp, torch.ones(1, 2), torch.ones(1, 2)), float)


def test_advantage_stats_hand():
    # A = [2 | -0.5 -0.5 -0.5 -0.5] (REINFORCE++ on rewards [5, 0], lengths [1, 4]); a third row has no tokens.
    # token-weighted: mean (2 - 2) / 5 = 0; var (4 + 4 * 0.25) / 5 = 1 -> std 1
    # sample-weighted: per-response means [2, -0.5] -> mean 0.75; var (1.25^2 + 1.25^2) / 2 = 1.5625 -> std 1.25
    adv = torch.tensor([[2.0, BIG, BIG, BIG], [-0.5, -0.5, -0.5, -0.5], [BIG, BIG, BIG, BIG]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    s = advantage_stats(adv, mask)
    assert s["advantage/mean_token"] == pytest.approx(0.0, abs=1e-7)
    assert s["advantage/std_token"] == pytest.approx(1.0, abs=1e-7)
    assert s["advantage/mean_sample"] == pytest.approx(0.75, abs=1e-7)
    assert s["advantage/std_sample"] == pytest.approx(1.25, abs=1e-7)


def test_after_reinforce_pp_token_mean_is_zero_but_sample_mean_is_not():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 7, 3, 8, 2, 5])
    m = (torch.arange(8)[None] < lengths[:, None]).float()
    # longer responses get lower rewards: the sample-weighted mean is pulled away from 0
    rewards = -lengths.float() + 0.1 * torch.randn(6, generator=g)
    a = compute_advantages("reinforce_pp", AdvantageInputs(rewards, m), AdvantageParams()).advantages
    s = advantage_stats(a, m)
    assert abs(s["advantage/mean_token"]) < 1e-6
    assert s["advantage/std_token"] == pytest.approx(1.0, abs=1e-6)
    assert s["advantage/mean_sample"] > 0.1


def test_metrics_whole_batch_equals_two_halves(split_run):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([1, 7, 3, 8, 2, 5])
    m = (torch.arange(8)[None] < lengths[:, None]).float()
    adv = torch.randn(6, 8, generator=g)
    logp, old = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    a, b, _ = split_run(advantage_stats, (adv[:2], m[:2]), (adv[2:], m[2:]))
    full = advantage_stats(adv, m)
    assert a == pytest.approx(full, abs=1e-6) and b == pytest.approx(full, abs=1e-6)
    a, b, _ = split_run(approx_kl, (logp[:4], old[:4], m[:4]), (logp[4:], old[4:], m[4:]))
    assert a == pytest.approx(approx_kl(logp, old, m), abs=1e-6) and a == b
    low, high = adv > 1, adv < -1
    a, b, _ = split_run(clip_fractions, (low[:3], high[:3], m[:3]), (low[3:], high[3:], m[3:]))
    assert a == pytest.approx(clip_fractions(low, high, m), abs=1e-7) and a == b


def test_group_reward_stats_hand():
    from reinforcepp.core import group_reward_stats

    m = group_reward_stats(torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 1]), 4)
    assert m["reward/uniform_groups"] == 0.5
    assert m["reward/group_std_mean"] == pytest.approx(math.sqrt(1 / 3) / 2, abs=1e-12)
    noisy = group_reward_stats(torch.tensor([1.0, 1 + 1e-3, 0.5, 0.5]), 2)
    assert noisy["reward/uniform_groups"] == 0.5  # 1e-3 apart is not uniform: a std normalisation sees it
