"""Advantage estimators (docs/algorithms.md, "The estimators"): one hand-computed example per
estimator, "reduces to" special cases, the registry and its refusals, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import (
    ESTIMATORS,
    AdvantageInputs,
    AdvantageParams,
    Advantages,
    compute_advantages,
    get_estimator,
    register_estimator,
)

EXACT = dict(atol=1e-6, rtol=0)
BIG = 1e6
ALL = ("reinforce_pp", "reinforce_pp_baseline", "grpo", "dr_grpo", "rloo", "gae", "reinforce")
GROUPED = ("reinforce_pp_baseline", "grpo", "dr_grpo", "rloo")


def mask_from_lengths(lengths, t):
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float()


def run(name, **kw):
    params = kw.pop("params", AdvantageParams())
    return compute_advantages(name, AdvantageInputs(**kw), params)


# Batch used by several hand examples: two responses of 1 and 4 tokens, rewards 5 and 0.
M14 = mask_from_lengths([1, 4], 4)
R14 = torch.tensor([5.0, 0.0])


# --- reinforce_pp -----------------------------------------------------------------------------


def test_reinforce_pp_hand_outcome_reward():
    # gamma 1, no KL: G = R_i on every real token: [5 | 0 0 0 0]
    # token-weighted mu = (5 + 0*4) / 5 = 1; var = ((5-1)^2 + 4 * (0-1)^2) / 5 = (16 + 4) / 5 = 4; std 2
    # A = [(5-1)/2 | (0-1)/2 x4] = [2 | -0.5 -0.5 -0.5 -0.5]
    out = run("reinforce_pp", rewards=R14, response_mask=M14)
    assert_close(out.advantages, torch.tensor([[2.0, 0, 0, 0], [-0.5, -0.5, -0.5, -0.5]]), **EXACT)
    assert_close(out.returns, torch.tensor([[5.0, 0, 0, 0], [0.0, 0, 0, 0]]), **EXACT)


def test_reinforce_pp_hand_kl_in_reward():
    # beta = 0.1, kl = [2 | 1 1 1 1] (padding holds 1e6), gamma 1
    # token rewards: [-0.2 + 5 = 4.8 | -0.1 -0.1 -0.1 -0.1]
    # returns (reward-to-go): [4.8 | -0.4 -0.3 -0.2 -0.1]
    # mu = (4.8 - 0.4 - 0.3 - 0.2 - 0.1) / 5 = 3.8 / 5 = 0.76
    # E[G^2] = (23.04 + 0.16 + 0.09 + 0.04 + 0.01) / 5 = 23.34 / 5 = 4.668; var = 4.668 - 0.76^2 = 4.0904
    kl = torch.tensor([[2.0, BIG, BIG, BIG], [1.0, 1.0, 1.0, 1.0]])
    out = run("reinforce_pp", rewards=R14, response_mask=M14, kl=kl, params=AdvantageParams(kl_coef=0.1))
    g = torch.tensor([[4.8, 0, 0, 0], [-0.4, -0.3, -0.2, -0.1]])
    assert_close(out.returns, g, **EXACT)
    assert_close(out.advantages, (g - 0.76) / math.sqrt(4.0904) * M14, **EXACT)


def test_reinforce_pp_hand_discounted():
    # One response of 3 tokens, R = 4, gamma = 0.5: r = [0, 0, 4] -> G = [1, 2, 4]
    # mu = 7/3; E[G^2] = 21/3 = 7; var = 7 - 49/9 = 14/9; A = (G - 7/3) * 3 / sqrt(14) = [-4, -1, 5] / sqrt(14)
    out = run(
        "reinforce_pp", rewards=torch.tensor([4.0]), response_mask=torch.ones(1, 3), params=AdvantageParams(gamma=0.5)
    )
    assert_close(out.returns, torch.tensor([[1.0, 2.0, 4.0]]), **EXACT)
    assert_close(out.advantages, torch.tensor([[-4.0, -1.0, 5.0]]) / math.sqrt(14.0), **EXACT)


def test_reinforce_pp_clips_rewards_at_10_by_default():
    # R = [50, 0] -> clipped to [10, 0]: returns [10 | 0 0 0 0]; whitened: mu 2, var (64 + 16)/5 = 16 -> [2 | -0.5 x4]
    out = run("reinforce_pp", rewards=torch.tensor([50.0, 0.0]), response_mask=M14)
    assert_close(out.returns, torch.tensor([[10.0, 0, 0, 0], [0.0, 0, 0, 0]]), **EXACT)
    assert_close(out.advantages, torch.tensor([[2.0, 0, 0, 0], [-0.5, -0.5, -0.5, -0.5]]), **EXACT)
    # another clip value
    out = run(
        "reinforce_pp", rewards=torch.tensor([50.0, -3.0]), response_mask=M14, params=AdvantageParams(reward_clip=2.0)
    )
    assert_close(out.returns, torch.tensor([[2.0, 0, 0, 0], [-2.0, -2.0, -2.0, -2.0]]), **EXACT)


def test_reinforce_pp_bootstrap_for_time_limit():
    # Gymnasium episode cut by a time limit with a bootstrap value: gamma 0.5, step rewards [1, 1], V_after = 4
    # G1 = 1 + 0.5 * 4 = 3; G0 = 1 + 0.5 * 3 = 2.5
    out = run(
        "reinforce_pp",
        rewards=torch.zeros(1),
        response_mask=torch.ones(1, 2),
        step_rewards=torch.ones(1, 2),
        last_values=torch.tensor([4.0]),
        params=AdvantageParams(gamma=0.5),
    )
    assert_close(out.returns, torch.tensor([[2.5, 3.0]]), **EXACT)
    # whitening of [2.5, 3]: mu 2.75, std 0.25 -> [-1, 1]
    assert_close(out.advantages, torch.tensor([[-1.0, 1.0]]), **EXACT)


@pytest.mark.parametrize("kl_none", [True, False])
def test_reinforce_pp_reduces_to_token_weighted_whitened_outcome_reward(kl_none):
    # kl_coef = 0 (or no KL) and gamma = 1: A[i, t] = (R_i - mu) / sqrt(var) on every real token,
    # mu = sum_i T_i R_i / sum_i T_i, var = sum_i T_i (R_i - mu)^2 / sum_i T_i.
    g = torch.Generator().manual_seed(3)
    lengths = [5, 1, 3, 8, 2, 8, 4, 6]
    m = mask_from_lengths(lengths, 8)
    rewards = torch.randn(8, generator=g) * 2
    kl = None if kl_none else torch.rand(8, 8, generator=g)
    out = run("reinforce_pp", rewards=rewards, response_mask=m, kl=kl, params=AdvantageParams(kl_coef=0.0))
    t = torch.tensor(lengths, dtype=torch.float64)
    r = rewards.double()
    mu = (t * r).sum() / t.sum()
    var = (t * (r - mu) ** 2).sum() / t.sum()
    expected = ((r - mu) / var.sqrt())[:, None] * m.double()
    assert_close(out.advantages.double(), expected, **EXACT)
    # and it is *not* the sample-weighted one (each response once): the check can fail
    sw = ((r - r.mean()) / r.std(unbiased=False))[:, None] * m.double()
    assert (out.advantages.double() - sw).abs().max() > 1e-2


# --- reinforce_pp_baseline ----------------------------------------------------------------------


def test_reinforce_pp_baseline_hand():
    # k = 2; groups [1, 3] and [5, 5]; lengths [1, 3, 2, 2]
    # R - group mean: [-1, 1, 0, 0] (no std division); G (gamma 1) = [-1 | 1 1 1 | 0 0 | 0 0]
    # mu = (-1 + 3) / 8 = 0.25; E[G^2] = (1 + 3) / 8 = 0.5; var = 0.5 - 0.0625 = 7/16; std = sqrt(7)/4
    # A = (G - 0.25) * 4 / sqrt(7): [-5 | 3 3 3 | -1 -1 | -1 -1] / sqrt(7)
    m = mask_from_lengths([1, 3, 2, 2], 3)
    out = run(
        "reinforce_pp_baseline", rewards=torch.tensor([1.0, 3.0, 5.0, 5.0]), response_mask=m, samples_per_prompt=2
    )
    s7 = math.sqrt(7.0)
    expected = torch.tensor([[-5.0, 0, 0], [3.0, 3, 3], [-1.0, -1, 0], [-1.0, -1, 0]]) / s7
    assert_close(out.advantages, expected, **EXACT)
    assert_close(out.returns, torch.tensor([[-1.0, 0, 0], [1.0, 1, 1], [0.0, 0, 0], [0.0, 0, 0]]), **EXACT)


def test_reinforce_pp_baseline_subtracts_the_baseline_before_clipping():
    # Spec order: group baseline, then clip. Group [30, 0, 0]: mean 10 -> [20, -10, -10] -> clip 10 -> [10, -10, -10].
    # (Clipping first would give [10, 0, 0] - 10/3 = [6.67, -3.33, -3.33].)
    m = torch.ones(3, 1)
    out = run("reinforce_pp_baseline", rewards=torch.tensor([30.0, 0.0, 0.0]), response_mask=m, samples_per_prompt=3)
    assert_close(out.returns, torch.tensor([[10.0], [-10.0], [-10.0]]), **EXACT)


def test_reinforce_pp_baseline_with_kl_in_reward():
    # k = 2, one token each: R = [2, 0] -> [1, -1]; kl = [1, 3], beta 0.5: r = [1 - 0.5, -1 - 1.5] = [0.5, -2.5]
    # mu = -1, var = (1.5^2 + 1.5^2)/2 = 2.25, std 1.5 -> A = [1, -1]
    out = run(
        "reinforce_pp_baseline",
        rewards=torch.tensor([2.0, 0.0]),
        response_mask=torch.ones(2, 1),
        samples_per_prompt=2,
        kl=torch.tensor([[1.0], [3.0]]),
        params=AdvantageParams(kl_coef=0.5),
    )
    assert_close(out.returns, torch.tensor([[0.5], [-2.5]]), **EXACT)
    assert_close(out.advantages, torch.tensor([[1.0], [-1.0]]), **EXACT)


def test_reinforce_pp_baseline_refuses_gamma_below_one():
    with pytest.raises(ValueError, match="gamma"):
        run("reinforce_pp_baseline", rewards=torch.zeros(2), response_mask=torch.ones(2, 2), samples_per_prompt=2,
            params=AdvantageParams(gamma=0.99))


# --- grpo, dr_grpo, rloo ------------------------------------------------------------------------

# Two prompts, k = 3: groups [1, 2, 6] and [0, 0, 3]; lengths 1..3.
R6 = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
M6 = mask_from_lengths([1, 2, 3, 3, 2, 1], 3)


def test_grpo_hand():
    # group 1: mean 3, deviations [-2, -1, 3], unbiased std sqrt((4+1+9)/2) = sqrt(7)
    # group 2: mean 1, deviations [-1, -1, 2], unbiased std sqrt((1+1+4)/2) = sqrt(3)
    # A_i = dev / (std + 1e-6), broadcast over the response's tokens; no global whitening
    s1, s2 = math.sqrt(7.0) + 1e-6, math.sqrt(3.0) + 1e-6
    per = torch.tensor([-2 / s1, -1 / s1, 3 / s1, -1 / s2, -1 / s2, 2 / s2])
    out = run("grpo", rewards=R6, response_mask=M6, samples_per_prompt=3)
    assert_close(out.advantages, per[:, None] * M6, **EXACT)
    assert_close(out.returns, R6[:, None] * M6, **EXACT)


def test_grpo_has_no_global_whitening():
    # A group's advantages do not depend on the other groups (global whitening would couple them).
    a = run("grpo", rewards=R6, response_mask=M6, samples_per_prompt=3).advantages
    r2 = R6.clone()
    r2[3:] = torch.tensor([100.0, -7.0, 9.0]) / 20
    b = run("grpo", rewards=r2, response_mask=M6, samples_per_prompt=3).advantages
    assert_close(a[:3], b[:3], atol=0, rtol=0)


def test_grpo_all_equal_rewards_give_zero_advantage():
    out = run("grpo", rewards=torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), response_mask=M6, samples_per_prompt=3)
    assert torch.isfinite(out.advantages).all()
    assert_close(out.advantages, torch.zeros_like(M6), atol=0, rtol=0)


def test_dr_grpo_hand():
    # A_i = R_i - mean_g = [-2, -1, 3, -1, -1, 2] broadcast (no std division)
    out = run("dr_grpo", rewards=R6, response_mask=M6, samples_per_prompt=3)
    assert_close(out.advantages, torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0])[:, None] * M6, **EXACT)
    assert get_estimator("dr_grpo").default_loss_agg == "seq-mean-token-sum-norm"


def test_rloo_hand():
    # A_i = R_i - mean_{j != i}: [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0] = [-3, -1.5, 4.5, -1.5, -1.5, 3]
    out = run("rloo", rewards=R6, response_mask=M6, samples_per_prompt=3)
    assert_close(out.advantages, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])[:, None] * M6, **EXACT)


def test_rloo_whiten_hand():
    # Token-weighted whitening of a = [-3, -1.5, 4.5, -1.5, -1.5, 3] with lengths [1, 2, 3, 3, 2, 1] (12 tokens):
    # sum = -3 - 3 + 13.5 - 4.5 - 3 + 3 = 3 -> mu = 0.25
    # sum a^2 = 9 + 2*2.25 + 3*20.25 + 3*2.25 + 2*2.25 + 9 = 94.5 -> E[a^2] = 7.875; var = 7.875 - 0.0625 = 7.8125
    out = run("rloo", rewards=R6, response_mask=M6, samples_per_prompt=3, params=AdvantageParams(whiten=True))
    a = torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    assert_close(out.advantages, ((a - 0.25) / math.sqrt(7.8125))[:, None] * M6, **EXACT)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_clip_after_the_group_baseline(name):
    # Spec order: group baseline (the estimator's group statistic), then clip to [-c, c]. c = 1, group [4, 0, 0, 0]:
    # grpo:    mean 1, devs [3, -1, -1, -1], unbiased std sqrt(12/3) = 2 -> [1.5, -0.5, -0.5, -0.5] / (1 + 5e-7)
    #          -> clip -> [1, -0.5, ...]
    # dr_grpo: devs [3, -1, -1, -1] -> clip -> [1, -1, -1, -1]
    # rloo:    [4 - 0, 0 - 4/3, 0 - 4/3, 0 - 4/3] -> clip -> [1, -1, -1, -1]
    # (clipping the raw rewards first, [1, 0, 0, 0], would give grpo [1.5, -0.5, ..], dr_grpo [0.75, -0.25, ..],
    # rloo [1, -1/3, ..])
    h = -1.0 / (2.0 + 1e-6)
    expected = {"grpo": [1.0, h, h, h], "dr_grpo": [1.0, -1.0, -1.0, -1.0], "rloo": [1.0, -1.0, -1.0, -1.0]}
    out = run(name, rewards=torch.tensor([4.0, 0.0, 0.0, 0.0]), response_mask=torch.ones(4, 1), samples_per_prompt=4,
              params=AdvantageParams(reward_clip=1.0))
    assert_close(out.advantages, torch.tensor(expected[name])[:, None], **EXACT)
    # the logged returns are the clipped scalar rewards
    assert_close(out.returns, torch.tensor([[1.0], [0.0], [0.0], [0.0]]), **EXACT)


# --- gae -----------------------------------------------------------------------------------------


def test_gae_estimator_hand():
    # gamma 0.9, lam 0.8, no KL. Row 0: 2 tokens, R = 1, V = [0.5, 1.0]; row 1: 1 token, R = 0, V = [0.25]
    # row 0: r = [0, 1]; delta1 = 1 - 1 = 0, delta0 = 0.9 * 1 - 0.5 = 0.4 -> A = [0.4, 0], targets A + V = [0.9, 1.0]
    # row 1: delta0 = 0 - 0.25 -> A = [-0.25], target 0
    # whitening of [0.4, 0, -0.25]: mu = 0.15 / 3 = 0.05; E[A^2] = (0.16 + 0.0625) / 3;
    # var = 0.2225/3 - 0.0025 = 0.215/3
    values = torch.tensor([[0.5, 1.0], [0.25, BIG]])
    m = mask_from_lengths([2, 1], 2)
    params = AdvantageParams(gamma=0.9, lam=0.8)
    out = run("gae", rewards=torch.tensor([1.0, 0.0]), response_mask=m, values=values, params=params)
    assert_close(out.returns, torch.tensor([[0.9, 1.0], [0.0, 0.0]]), **EXACT)
    raw = torch.tensor([[0.4, 0.0], [-0.25, 0.0]])
    assert_close(out.advantages, (raw - 0.05) / math.sqrt(0.215 / 3) * m, **EXACT)


def test_gae_needs_values():
    with pytest.raises(ValueError, match="critic values"):
        run("gae", rewards=torch.zeros(1), response_mask=torch.ones(1, 2))


# --- reinforce ------------------------------------------------------------------------------------


def test_reinforce_hand_no_normalisation():
    # gamma 0.5, beta 0.1, kl = 1 everywhere; R = [5, 2], lengths [1, 4]
    # row 0: r = [5 - 0.1] = [4.9] -> G = [4.9]
    # row 1: r = [-0.1, -0.1, -0.1, 2 - 0.1 = 1.9]
    #   G3 = 1.9; G2 = -0.1 + 0.5*1.9 = 0.85; G1 = -0.1 + 0.425 = 0.325; G0 = -0.1 + 0.1625 = 0.0625
    out = run(
        "reinforce",
        rewards=torch.tensor([5.0, 2.0]),
        response_mask=M14,
        kl=torch.ones(2, 4),
        params=AdvantageParams(gamma=0.5, kl_coef=0.1),
    )
    g = torch.tensor([[4.9, 0, 0, 0], [0.0625, 0.325, 0.85, 1.9]])
    assert_close(out.advantages, g, **EXACT)
    assert_close(out.returns, g, **EXACT)


# --- registry ------------------------------------------------------------------------------------


def test_registry_holds_the_seven_estimators_with_their_requirements():
    assert set(ALL) <= set(ESTIMATORS)
    for name in ALL:
        spec = get_estimator(name)
        assert spec.needs_groups == (name in GROUPED), name
        assert spec.needs_critic == (name == "gae"), name
        # estimators that broadcast one scalar per response cannot carry per-token KL rewards
        assert spec.kl_in_reward == (name not in ("grpo", "dr_grpo", "rloo")), name


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError) as info:
        run("ppo2", rewards=torch.zeros(1), response_mask=torch.ones(1, 1))
    msg = str(info.value)
    assert "'ppo2'" in msg
    for name in ALL:
        assert name in msg


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_estimators_refuse_one_sample_per_prompt(name):
    with pytest.raises(ValueError, match=rf"{name!r} needs samples_per_prompt >= 2.*got 1"):
        run(name, rewards=torch.zeros(4), response_mask=torch.ones(4, 2), samples_per_prompt=1)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_broadcast_estimators_refuse_kl_in_reward(name):
    with pytest.raises(ValueError, match="does not take KL in the reward"):
        run(name, rewards=torch.zeros(2), response_mask=torch.ones(2, 2), samples_per_prompt=2, kl=torch.zeros(2, 2))


@pytest.mark.parametrize("name", ALL)
def test_all_zero_mask_raises(name):
    with pytest.raises(ValueError, match="all zero"):
        run(name, rewards=torch.zeros(2), response_mask=torch.zeros(2, 3), samples_per_prompt=2,
            values=torch.zeros(2, 3))


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="samples_per_prompt=2"):
        run("grpo", rewards=torch.zeros(3), response_mask=torch.ones(3, 1), samples_per_prompt=2)


@pytest.fixture
def scratch_registry():
    before = dict(ESTIMATORS)
    yield
    ESTIMATORS.clear()
    ESTIMATORS.update(before)


def test_register_estimator(scratch_registry):
    @register_estimator("twice_reward", needs_groups=True, kl_in_reward=False, default_loss_agg="seq-mean-token-mean")
    def twice_reward(inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
        a = 2 * inputs.rewards[:, None] * inputs.response_mask
        return Advantages(a, a)

    spec = get_estimator("twice_reward")
    assert spec.fn is twice_reward and spec.needs_groups and not spec.kl_in_reward
    assert spec.default_loss_agg == "seq-mean-token-mean"
    m = mask_from_lengths([2, 1], 2)
    out = run("twice_reward", rewards=torch.tensor([1.0, -3.0]), response_mask=m, samples_per_prompt=2)
    assert_close(out.advantages, torch.tensor([[2.0, 2.0], [-6.0, 0.0]]), **EXACT)
    # the registry's checks apply to user estimators too
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        run("twice_reward", rewards=torch.zeros(2), response_mask=torch.ones(2, 1), samples_per_prompt=1)
    # a name is registered once unless overwrite=True
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("twice_reward")(twice_reward)
    register_estimator("twice_reward", overwrite=True)(twice_reward)
    assert not get_estimator("twice_reward").needs_groups


def test_registry_cleanup_left_no_trace():
    assert "twice_reward" not in ESTIMATORS


# --- edge cases ------------------------------------------------------------------------------------


def _inputs_with_padding(fill: float):
    lengths = [3, 1, 4, 2]
    m = mask_from_lengths(lengths, 4)
    g = torch.Generator().manual_seed(5)
    pad = lambda x: torch.where(m.bool(), x, torch.full_like(x, fill))  # noqa: E731
    return dict(
        rewards=torch.randn(4, generator=g),
        response_mask=m,
        samples_per_prompt=2,
        values=pad(torch.randn(4, 4, generator=g)),
        step_rewards=pad(torch.randn(4, 4, generator=g)),
        kl=pad(torch.rand(4, 4, generator=g)),
    )


@pytest.mark.parametrize("name", ALL)
def test_padding_never_leaks(name):
    params = AdvantageParams(kl_coef=0.05, gamma=1.0, lam=0.9, whiten=True)
    outs = []
    for fill in (0.0, BIG):
        kw = _inputs_with_padding(fill)
        if not get_estimator(name).kl_in_reward:
            kw.pop("kl")
            kw.pop("step_rewards")
        outs.append(run(name, params=params, **kw))
    assert_close(outs[1].advantages, outs[0].advantages, atol=0, rtol=0)
    assert_close(outs[1].returns, outs[0].returns, atol=0, rtol=0)
    m = _inputs_with_padding(0.0)["response_mask"]
    assert (outs[0].advantages * (1 - m) == 0).all() and (outs[0].returns * (1 - m) == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_length_one_responses(name):
    # Every response has one token: returns = R (gamma irrelevant); results finite, padding zero.
    m = mask_from_lengths([1, 1, 1, 1], 3)
    r = torch.tensor([1.0, 0.0, 2.0, 2.0])
    out = run(
        name, rewards=r, response_mask=m, samples_per_prompt=2, values=torch.zeros(4, 3), params=AdvantageParams()
    )
    assert torch.isfinite(out.advantages).all()
    assert (out.advantages[:, 1:] == 0).all()
    first = out.advantages[:, 0]
    if name in ("reinforce_pp", "gae"):
        # whitening of [1, 0, 2, 2]: mu 1.25, var (0.0625 + 1.5625 + 0.5625 * 2) / 4 = 0.6875
        assert_close(first, (r - 1.25) / math.sqrt(0.6875), **EXACT)
    elif name == "reinforce":
        assert_close(first, r, **EXACT)
    elif name == "reinforce_pp_baseline":
        # groups [1, 0], [2, 2] -> [0.5, -0.5, 0, 0]; whitened: mu 0, var 0.125 -> [sqrt 2, -sqrt 2, 0, 0]
        assert_close(first, torch.tensor([math.sqrt(2), -math.sqrt(2), 0.0, 0.0]), **EXACT)
    elif name == "grpo":
        # group 1: devs [0.5, -0.5], unbiased std sqrt(0.5); group 2: all equal -> 0
        s = math.sqrt(0.5) + 1e-6
        assert_close(first, torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0]), **EXACT)
    elif name == "dr_grpo":
        assert_close(first, torch.tensor([0.5, -0.5, 0.0, 0.0]), **EXACT)
    elif name == "rloo":
        assert_close(first, torch.tensor([1.0, -1.0, 0.0, 0.0]), **EXACT)
