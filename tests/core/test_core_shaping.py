"""Reward shaping (docs/algorithms.md, "The pipeline, in order"): length penalties, group baselines, clip,
token rewards."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import (
    clip_rewards,
    group_mean_baseline,
    group_normalize,
    last_token_index,
    leave_one_out_baseline,
    overlong_penalty,
    token_rewards,
    truncation_penalty,
)
from reinforcepp.core.shaping import group_view, require_groups

EXACT = dict(atol=1e-6, rtol=0)
BIG = 1e6


# --- last_token_index -------------------------------------------------------------------------


def test_last_token_index_right_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 0, 3]


def test_last_token_index_bool_mask_and_holes():
    # The prompt part is masked out (left zeros) and one hole: the last set position wins.
    mask = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [3, 4]


def test_last_token_index_rejects_empty_rows_and_bad_rank():
    with pytest.raises(ValueError, match=r"responses \[1\] have an all-zero response_mask"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        last_token_index(torch.tensor([1, 0]))


# --- group baselines --------------------------------------------------------------------------

# Two prompts, k = 3: groups [1, 2, 6] and [0, 0, 3].
R = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])


def test_group_view_layout_and_errors():
    assert group_view(R, 3).tolist() == [[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]]
    with pytest.raises(ValueError, match="samples_per_prompt=4"):
        group_view(R, 4)
    with pytest.raises(ValueError):
        group_view(R, 0)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        group_view(R.view(2, 3), 3)


def test_group_mean_baseline_hand():
    # means 3 and 1: [1-3, 2-3, 6-3, 0-1, 0-1, 3-1]
    assert_close(group_mean_baseline(R, 3), torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]), **EXACT)


def test_group_normalize_uses_unbiased_std_plus_eps():
    # group 1: mean 3, deviations [-2, -1, 3], unbiased var (4 + 1 + 9) / (3 - 1) = 7, std sqrt(7)
    # group 2: mean 1, deviations [-1, -1, 2], unbiased var (1 + 1 + 4) / 2 = 3, std sqrt(3)
    s1, s2 = math.sqrt(7.0) + 1e-6, math.sqrt(3.0) + 1e-6
    expected = torch.tensor([-2 / s1, -1 / s1, 3 / s1, -1 / s2, -1 / s2, 2 / s2])
    assert_close(group_normalize(R, 3), expected, **EXACT)


def test_group_normalize_all_equal_group_gives_zero_not_nan():
    # (R - mean) = 0 and std = 0: 0 / (0 + 1e-6) = 0
    out = group_normalize(torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 1.0]), 3)
    assert torch.isfinite(out).all()
    assert_close(out[:3], torch.zeros(3), atol=0, rtol=0)


def test_leave_one_out_baseline_hand():
    # group 1: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5
    # group 2: 0 - (0+3)/2 = -1.5; -1.5; 3 - 0 = 3
    expected = torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    assert_close(leave_one_out_baseline(R, 3), expected, **EXACT)
    # ... which is k/(k-1) * (R - mean_g)
    assert_close(leave_one_out_baseline(R, 3), 1.5 * group_mean_baseline(R, 3), **EXACT)


def test_require_groups_message():
    require_groups("grpo", 2)
    with pytest.raises(ValueError, match=r"'grpo' needs samples_per_prompt >= 2.*got 1"):
        require_groups("grpo", 1)


# --- clip, length penalties -------------------------------------------------------------------


def test_clip_rewards():
    clipped = clip_rewards(torch.tensor([-12.0, -3.0, 0.0, 9.5, 40.0]), 10.0)
    assert_close(clipped, torch.tensor([-10.0, -3.0, 0.0, 9.5, 10.0]), **EXACT)
    with pytest.raises(ValueError):
        clip_rewards(torch.tensor([1.0]), 0.0)


def test_overlong_penalty_three_regions():
    # max_length 10, buffer 4: the ramp starts after L = 10 - 4 = 6.
    # L <= 6 -> 0;  6 < L <= 10 -> (6 - L) / 4;  L > 10 -> -1
    lengths = torch.tensor([1, 6, 7, 8, 10, 11, 50])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0])
    assert_close(overlong_penalty(lengths, max_length=10, buffer=4), expected, **EXACT)
    # factor scales every region
    assert_close(overlong_penalty(lengths, max_length=10, buffer=4, factor=2.0), 2 * expected, **EXACT)
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_length=10, buffer=0)
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_length=10, buffer=11)


def test_truncation_penalty():
    # -penalty on truncated responses, 0 elsewhere
    out = truncation_penalty(torch.tensor([True, False, True]), 0.5)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([-0.5, 0.0, -0.5]), **EXACT)


# --- token rewards ----------------------------------------------------------------------------


def test_token_rewards_kl_on_every_token_reward_on_last():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kl = torch.tensor([[0.5, 1.0, 2.0, BIG], [3.0, BIG, BIG, BIG]])
    rewards = torch.tensor([1.0, -2.0])
    # beta = 0.1: r = -0.1 * kl on real tokens, + R on the last real token, 0 on padding
    # row 0: [-0.05, -0.1, -0.2 + 1 = 0.8, 0]
    # row 1: [-0.3 - 2 = -2.3, 0, 0, 0]
    expected = torch.tensor([[-0.05, -0.1, 0.8, 0.0], [-2.3, 0.0, 0.0, 0.0]])
    out = token_rewards(rewards, mask, kl, kl_coef=0.1)
    assert out.dtype == torch.float32
    assert_close(out, expected, **EXACT)


def test_token_rewards_without_kl():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = token_rewards(torch.tensor([2.0, 3.0]), mask)
    assert_close(out, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]), **EXACT)


def test_token_rewards_step_rewards():
    # Gymnasium: rewards per step, scalar reward 0 (or a terminal bonus on the last step).
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    step = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, BIG]])
    # row 0: [1, 2, 3 + 0.5]; row 1: [4, 5 + 0, 0]
    out = token_rewards(torch.tensor([0.5, 0.0]), mask, step_rewards=step)
    assert_close(out, torch.tensor([[1.0, 2.0, 3.5], [4.0, 5.0, 0.0]]), **EXACT)


def test_token_rewards_length_one_response():
    out = token_rewards(torch.tensor([4.0]), torch.tensor([[1, 0, 0]]), torch.tensor([[1.0, BIG, BIG]]), kl_coef=0.5)
    # -0.5 * 1 + 4 = 3.5
    assert_close(out, torch.tensor([[3.5, 0.0, 0.0]]), **EXACT)
