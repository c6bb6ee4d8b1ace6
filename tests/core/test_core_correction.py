"""Off-policy correction for asynchronous rollouts (reinforcepp.core.correction), by hand.

The hand batch: the proximal-to-behaviour ratios pi_prox / mu of the real tokens are
    row 0: 0.5, 1, 1.5, 3   (product 2.25, geometric mean 2.25^(1/4) = sqrt(1.5))
    row 1: 4, 0.25          (product 1,    geometric mean 1)
and the padding holds nan / inf, which must never reach a weight or a statistic.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import (
    CORRECTION_LEVELS,
    CORRECTION_MODES,
    aggregate,
    check_rollout_correction,
    correction_stats,
    policy_loss,
    rollout_correction,
    staleness_stats,
    truncated_importance_weights,
)
from reinforcepp.core.correction import LOG_WEIGHT_BOUND

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
RATIOS = [[0.5, 1.0, 1.5, 3.0], [4.0, 0.25]]
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
SQRT15 = math.sqrt(1.5)


def _batch(pad_old: float = NAN, pad_behaviour: float = INF, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    """old_logprobs, behaviour_logprobs of the hand batch, padding filled with the given values."""
    behaviour = torch.tensor([[-0.3, -1.2, -2.0, -0.7, 0.0], [-1.1, -0.4, 0.0, 0.0, 0.0]], dtype=F64)
    old = behaviour.clone()
    for i, row in enumerate(RATIOS):
        for t, ratio in enumerate(row):
            old[i, t] = behaviour[i, t] + math.log(ratio)
    pad = MASK == 0
    old[pad], behaviour[pad] = pad_old, pad_behaviour
    return old.to(dtype), behaviour.to(dtype)


def _rows(*rows: list[float]) -> torch.Tensor:
    """A (2, 5) tensor from the real-token values of each row, zeros on the padding."""
    out = torch.zeros(2, 5, dtype=F64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=F64)
    return out


ALL, NONE_ = [1, 1, 1, 1], [0, 0, 0, 0]
# (mode, level, low, high, weights, masked, truncated): each by hand from RATIOS
CASES = [
    ("truncate", "token", None, 2.0, _rows([0.5, 1, 1.5, 2], [2, 0.25]), _rows(), _rows([0, 0, 0, 1], [1, 0])),
    ("mask", "token", 0.4, 2.0, _rows([0.5, 1, 1.5, 0], [0, 0]), _rows([0, 0, 0, 1], [1, 1]), _rows()),
    ("mask", "token", None, 3.5, _rows([0.5, 1, 1.5, 3], [0, 0.25]), _rows([0, 0, 0, 0], [1, 0]), _rows()),
    ("none", "token", None, None, _rows([0.5, 1, 1.5, 3], [4, 0.25]), _rows(), _rows()),
    # sequence: w_0 = 0.5 * 1 * 1.5 * 3 = 2.25, w_1 = 4 * 0.25 = 1, on every real token
    ("truncate", "sequence", None, 2.0, _rows([2] * 4, [1, 1]), _rows(), _rows(ALL, [0, 0])),
    ("mask", "sequence", 0.5, 2.0, _rows(NONE_, [1, 1]), _rows(ALL, [0, 0]), _rows()),
    ("mask", "sequence", 0.5, 2.5, _rows([2.25] * 4, [1, 1]), _rows(), _rows()),
    ("none", "sequence", None, None, _rows([2.25] * 4, [1, 1]), _rows(), _rows()),
    # geometric: w_0 = 2.25^(1/4) = sqrt(1.5) = 1.2247, w_1 = 1^(1/2) = 1
    ("truncate", "geometric", None, 1.2, _rows([1.2] * 4, [1, 1]), _rows(), _rows(ALL, [0, 0])),
    ("mask", "geometric", 0.8, 1.2, _rows(NONE_, [1, 1]), _rows(ALL, [0, 0]), _rows()),
    ("mask", "geometric", 0.8, 1.25, _rows([SQRT15] * 4, [1, 1]), _rows(), _rows()),
    ("none", "geometric", None, None, _rows([SQRT15] * 4, [1, 1]), _rows(), _rows()),
]


@pytest.mark.parametrize("mode, level, low, high, weights, masked, truncated", CASES)
def test_weights_by_hand_for_every_mode_and_level(mode, level, low, high, weights, masked, truncated):
    old, behaviour = _batch()
    r = rollout_correction(old, behaviour, MASK, mode, level, low, high)
    assert_close(r.weights, weights, atol=1e-12, rtol=0)
    assert torch.equal(r.masked, masked.bool()) and torch.equal(r.truncated, truncated.bool())
    assert r.weights.dtype == F64 and not r.weights.requires_grad


@pytest.mark.parametrize("level, row0, row1", [
    ("token", [math.log(x) for x in RATIOS[0]], [math.log(4.0), math.log(0.25)]),
    ("sequence", [math.log(2.25)] * 4, [0.0, 0.0]),
    ("geometric", [math.log(2.25) / 4] * 4, [0.0, 0.0]),
])
def test_log_ratio_is_at_the_chosen_level_before_truncation_and_zero_on_padding(level, row0, row1):
    old, behaviour = _batch()
    for mode, high in (("truncate", 1.1), ("none", None)):
        r = rollout_correction(old, behaviour, MASK, mode, level, high=high)
        assert_close(r.log_ratio, _rows(row0, row1), atol=1e-12, rtol=0)


def test_padding_never_leaks():
    # inf, nan, huge values in the padding of either input: every result equals the one of clean padding
    clean = _batch(0.0, 0.0)
    for pad_old, pad_behaviour in ((NAN, INF), (INF, INF), (-INF, INF), (INF, -INF), (1e6, -1e6), (NAN, NAN)):
        dirty = _batch(pad_old, pad_behaviour)
        for mode, level, low, high, *_ in CASES:
            a = rollout_correction(*clean, MASK, mode, level, low, high)
            b = rollout_correction(*dirty, MASK, mode, level, low, high)
            for x, y in zip(a, b):
                assert torch.equal(x, y), (pad_old, pad_behaviour, mode, level)
            assert bool(torch.isfinite(b.weights).all()) and bool(torch.isfinite(b.log_ratio).all())
            assert not bool(b.masked[MASK == 0].any()) and bool((b.weights[MASK == 0] == 0).all())


@pytest.mark.parametrize("level", CORRECTION_LEVELS)
@pytest.mark.parametrize("mode, low, high", [("truncate", None, 2.0), ("truncate", None, 1.0), ("mask", 0.5, 2.0),
                                             ("mask", None, 1.0), ("mask", 1.0, 1.5), ("none", None, None)])
def test_identical_logprobs_give_weight_exactly_one_and_mask_nothing(mode, level, low, high):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 7, generator=g) * 5 - 3
    mask = (torch.arange(7)[None] < torch.tensor([7, 1, 4, 6])[:, None]).long()
    behaviour = torch.where(mask.bool(), old, torch.full_like(old, INF))  # the real tokens agree exactly
    r = rollout_correction(old, behaviour, mask, mode, level, low, high)
    assert torch.equal(r.weights, mask.float())
    assert not bool(r.masked.any()) and not bool(r.truncated.any())
    assert torch.equal(r.log_ratio, torch.zeros(4, 7))
    stats = correction_stats(r, mask)
    assert stats["rollout/is_weight_mean"] == 1.0 and stats["rollout/is_ess"] == 1.0
    assert stats["rollout/masked_fraction"] == 0.0 and stats["rollout/truncated_fraction"] == 0.0


def test_no_overflow_at_any_log_ratio():
    # 10 tokens with log-ratio +-1000: a product of e^10000, computed in log space
    old = torch.cat([torch.full((1, 10), 1000.0), torch.full((1, 10), -1000.0)])
    behaviour, mask = torch.zeros(2, 10), torch.ones(2, 10)
    for level in CORRECTION_LEVELS:
        t = rollout_correction(old, behaviour, mask, "truncate", level, high=3.0)
        assert_close(t.weights, torch.stack([torch.full((10,), 3.0), torch.zeros(10)]), atol=1e-6, rtol=0)
        n = rollout_correction(old, behaviour, mask, "none", level)
        assert_close(n.weights[0], torch.full((10,), math.exp(LOG_WEIGHT_BOUND)), rtol=1e-6, atol=0)
        assert bool((n.weights[1] == 0).all())
        m = rollout_correction(old, behaviour, mask, "mask", level, low=0.5, high=2.0)
        assert bool(m.masked.all()) and bool((m.weights == 0).all())
        for r in (t, n, m):
            assert bool(torch.isfinite(r.weights).all())
            s = correction_stats(r, mask)
            assert all(math.isfinite(v) for v in s.values())


def test_real_tokens_with_infinite_log_ratio():
    # mu(y) = 0 on a real token (log-ratio +inf): capped by truncate, masked by mask.
    # pi_prox(y) = 0 (log-ratio -inf): weight 0, and masked once low > 0.
    behaviour = torch.tensor([[-INF, 0.0, 0.0]])
    old = torch.tensor([[0.0, -INF, 0.0]])
    mask = torch.ones(1, 3)
    t = rollout_correction(old, behaviour, mask, "truncate", "token", high=2.0)
    assert torch.equal(t.weights, torch.tensor([[2.0, 0.0, 1.0]])) and t.truncated.tolist() == [[True, False, False]]
    m = rollout_correction(old, behaviour, mask, "mask", "token", high=2.0)
    assert torch.equal(m.weights, torch.tensor([[0.0, 0.0, 1.0]])) and m.masked.tolist() == [[True, False, False]]
    m = rollout_correction(old, behaviour, mask, "mask", "token", low=0.1, high=2.0)
    assert m.masked.tolist() == [[True, True, False]]


def _loop_reference(old, behaviour, mask, mode, level, low, high):
    """One response at a time, one token at a time, with math.exp."""
    n, t = old.shape
    w = torch.zeros(n, t, dtype=F64)
    masked = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):
        real = [s for s in range(t) if mask[i, s]]
        diffs = {s: float(old[i, s]) - float(behaviour[i, s]) for s in real}
        for s in real:
            if level == "token":
                lr = diffs[s]
            else:
                lr = sum(diffs.values()) / (len(real) if level == "geometric" else 1)
            if mode == "truncate":
                w[i, s] = min(math.exp(lr), high)
            elif mode == "none":
                w[i, s] = math.exp(lr)
            elif (low or 0.0) <= math.exp(lr) <= high:
                w[i, s] = math.exp(lr)
            else:
                masked[i, s] = True
    return w, masked


@pytest.mark.parametrize("level", CORRECTION_LEVELS)
@pytest.mark.parametrize("mode, low, high", [("truncate", None, 1.3), ("mask", 0.7, 1.4), ("mask", None, 1.2),
                                             ("none", None, None)])
def test_vectorised_equals_loop(mode, level, low, high):
    g = torch.Generator().manual_seed(1)
    old = torch.randn(6, 9, generator=g, dtype=F64) - 2
    behaviour = old + 0.3 * torch.randn(6, 9, generator=g, dtype=F64)
    mask = (torch.arange(9)[None] < torch.tensor([9, 1, 5, 3, 8, 2])[:, None]).long()
    r = rollout_correction(old, behaviour, mask, mode, level, low, high)
    w, masked = _loop_reference(old, behaviour, mask, mode, level, low, high)
    assert_close(r.weights, w, atol=1e-12, rtol=1e-12)
    assert torch.equal(r.masked, masked)
    assert 0 < int(masked.sum()) < int(mask.sum()) or mode != "mask"  # the data exercise both sides of the bounds


def test_weights_carry_no_gradient_and_keep_the_input_precision():
    old, behaviour = _batch(0.0, 0.0, dtype=torch.float32)
    old.requires_grad_(True)
    r = rollout_correction(old, behaviour, MASK, "truncate", "sequence", high=2.0)
    assert not r.weights.requires_grad and r.weights.dtype == torch.float32 and r.log_ratio.dtype == torch.float32
    bf16 = rollout_correction(old.detach().bfloat16(), behaviour.bfloat16(), MASK, "none")
    assert bf16.weights.dtype == torch.float32
    assert rollout_correction(old.detach().double(), behaviour, MASK, "none").weights.dtype == F64


def test_decoupled_loss_gradient_by_hand():
    # L = aggregate(w * L_clip): with pi_theta = pi_prox (r = 1) dL/dlogp[i,t] = -A w / T_W. The token
    # masked by ICEPOP-style masking gets no gradient but still counts in T_W = 6 (the normaliser is untouched).
    old, behaviour = _batch(0.0, 0.0)
    logp = old.clone().requires_grad_(True)
    adv = _rows([1.0, -2.0, 0.5, 3.0], [1.0, -1.0])
    w = rollout_correction(old, behaviour, MASK, "mask", "token", low=0.4, high=2.0).weights  # 0.5, 1, 1.5, 0 | 0, 0
    aggregate(w * policy_loss(logp, old, adv).loss, MASK.to(F64)).backward()
    expected = _rows([-0.5 * 1.0, 2.0 * 1.0, -1.5 * 0.5, 0.0], [0.0, 0.0]) / 6
    assert_close(logp.grad, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cap", [0.25, 1.0, 2.0, 7.5])
def test_truncated_importance_weights_is_the_token_truncate_case(cap):
    g = torch.Generator().manual_seed(2)
    old = torch.randn(5, 6, generator=g) - 1
    sampler = old + torch.randn(5, 6, generator=g)
    full = torch.ones(5, 6)
    general = rollout_correction(old, sampler, full, "truncate", "token", high=cap).weights
    assert torch.equal(truncated_importance_weights(old, sampler, cap), general)
    ref = torch.minimum(torch.exp((old - sampler).double()), torch.tensor(cap, dtype=F64)).float()
    assert_close(general, ref, atol=0, rtol=1e-6)


@pytest.mark.parametrize("mode, level, low, high, match", [
    ("clip", "token", None, 2.0, "unknown rollout correction mode 'clip'"),
    ("truncate", "seq", None, 2.0, "unknown rollout correction level 'seq'"),
    ("truncate", "token", None, None, "finite upper bound"),
    ("truncate", "token", None, INF, "finite upper bound"),
    ("truncate", "token", None, NAN, "finite upper bound"),
    ("truncate", "token", None, 0.0, "high > 0"),
    ("truncate", "token", None, -1.0, "high > 0"),
    ("truncate", "token", 0.5, 2.0, "caps weights from above only"),
    ("mask", "sequence", None, None, "finite upper bound"),
    ("mask", "token", -0.1, 2.0, "low must be finite and >= 0"),
    ("mask", "token", NAN, 2.0, "low must be finite and >= 0"),
    ("mask", "token", 2.0, 0.5, "empty or reversed"),
    ("mask", "token", 1.0, 1.0, "empty or reversed"),
    ("mask", "geometric", 0.5, 0.9, "must contain 1"),
    ("mask", "token", 1.1, 2.0, "must contain 1"),
    ("none", "token", None, 2.0, "takes no bounds"),
    ("none", "token", 0.5, None, "takes no bounds"),
])
def test_bad_arguments_raise(mode, level, low, high, match):
    with pytest.raises(ValueError, match=match):
        check_rollout_correction(mode, level, low, high)
    old, behaviour = _batch()
    with pytest.raises(ValueError, match=match):
        rollout_correction(old, behaviour, MASK, mode, level, low, high)


def test_valid_names_and_shape_checks():
    assert CORRECTION_MODES == ("truncate", "mask", "none") and CORRECTION_LEVELS == ("token", "sequence", "geometric")
    check_rollout_correction("mask", "geometric", 0.999, 1.001)  # verl's recommended geometric range passes
    old, behaviour = _batch()
    with pytest.raises(ValueError, match="differ in shape"):
        rollout_correction(old, behaviour[:, :4], MASK, high=2.0)
    with pytest.raises(ValueError, match="differ in shape"):
        rollout_correction(old, behaviour, MASK[:1], high=2.0)
    with pytest.raises(ValueError, match=r"must be \(N, T\)"):
        rollout_correction(old[0], behaviour[0], MASK[0], high=2.0)


# ---------------------------------------------------------------- statistics


def test_correction_stats_by_hand():
    old, behaviour = _batch()
    # truncate, token, C = 2: w = 0.5, 1, 1.5, 2 | 2, 0.25 on n = 6 real tokens
    s = correction_stats(rollout_correction(old, behaviour, MASK, "truncate", "token", high=2.0), MASK)
    sum_w, sum_w2 = 7.25, 0.25 + 1 + 2.25 + 4 + 4 + 0.0625
    assert s == pytest.approx({
        "rollout/is_weight_mean": sum_w / 6, "rollout/is_weight_max": 2.0, "rollout/is_weight_min": 0.25,
        "rollout/is_ess": sum_w**2 / (6 * sum_w2), "rollout/masked_fraction": 0.0,
        "rollout/masked_sequence_fraction": 0.0, "rollout/truncated_fraction": 2 / 6,
    }, abs=1e-12, rel=0)
    # mask, token, [0.4, 2]: w = 0.5, 1, 1.5, 0 | 0, 0: sum 3, sum of squares 3.5, ESS 9 / 21; both rows touched
    s = correction_stats(rollout_correction(old, behaviour, MASK, "mask", "token", low=0.4, high=2.0), MASK)
    assert s == pytest.approx({
        "rollout/is_weight_mean": 0.5, "rollout/is_weight_max": 1.5, "rollout/is_weight_min": 0.0,
        "rollout/is_ess": 3 / 7, "rollout/masked_fraction": 0.5,
        "rollout/masked_sequence_fraction": 1.0, "rollout/truncated_fraction": 0.0,
    }, abs=1e-12, rel=0)
    # mask, sequence, [0.5, 2]: row 0 (4 tokens) rejected whole, row 1 kept at w = 1
    s = correction_stats(rollout_correction(old, behaviour, MASK, "mask", "sequence", low=0.5, high=2.0), MASK)
    assert s["rollout/masked_fraction"] == pytest.approx(4 / 6, abs=1e-12)
    assert s["rollout/masked_sequence_fraction"] == 0.5
    assert s["rollout/is_ess"] == pytest.approx(4 / (6 * 2), abs=1e-12)  # (1 + 1)^2 / (6 (1 + 1))


def test_correction_stats_of_an_empty_mask_are_zero():
    old, behaviour = _batch()
    empty = torch.zeros_like(MASK)
    s = correction_stats(rollout_correction(old, behaviour, empty, "truncate", high=2.0), empty)
    assert set(s.values()) == {0.0}


def test_correction_stats_two_ranks_equal_one(split_run):
    g = torch.Generator().manual_seed(3)
    old = torch.randn(6, 8, generator=g) - 2
    behaviour = old + 0.4 * torch.randn(6, 8, generator=g)
    mask = (torch.arange(8)[None] < torch.tensor([8, 2, 5, 1, 7, 3])[:, None]).long()
    for mode, level, low, high in (("mask", "sequence", 0.6, 1.6), ("truncate", "token", None, 1.3)):
        r = rollout_correction(old, behaviour, mask, mode, level, low, high)
        whole = correction_stats(r, mask)
        halves = [type(r)(*(x[:2] for x in r)), type(r)(*(x[2:] for x in r))]  # rank 0: 10 tokens, rank 1: 16
        a, b, calls = split_run(correction_stats, (halves[0], mask[:2]), (halves[1], mask[2:]))
        assert calls == [1, 1]
        for key in whole:
            if key.endswith("_max"):
                assert max(a[key], b[key]) == whole[key]
            elif key.endswith("_min"):
                assert min(a[key], b[key]) == whole[key]
            else:
                assert a[key] == pytest.approx(whole[key], abs=1e-12) and b[key] == pytest.approx(whole[key], abs=1e-12)
        assert 0 < whole["rollout/masked_fraction"] < 1 or mode != "mask"


def test_staleness_stats_by_hand():
    # current version 6; padding holds -1 and 99 (a "future" version there is ignored)
    versions = torch.tensor([[5, 5, 4, 4], [3, 3, -1, 99], [6, 6, 6, -1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    s = staleness_stats(versions, mask, current_version=6)
    # tokens: 1, 1, 2, 2 | 3, 3 | 0, 0, 0 -> 12 / 9; responses (oldest token): 2 | 3 | 0 -> 5 / 3, max 3;
    # row 0 mixes versions 5 and 4 -> 1 / 3
    assert s == pytest.approx({
        "staleness/token_mean": 12 / 9, "staleness/sequence_mean": 5 / 3, "staleness/sequence_max": 3.0,
        "staleness/mixed_sequence_fraction": 1 / 3,
    }, abs=1e-12, rel=0)
    on_policy = staleness_stats(torch.full((3, 4), 6), mask, current_version=6)
    assert set(on_policy.values()) == {0.0}
    assert set(staleness_stats(versions, torch.zeros_like(mask), 6).values()) == {0.0}


def test_staleness_stats_two_ranks_equal_one(split_run):
    versions = torch.tensor([[5, 5, 4, 4], [3, 3, -1, 99], [6, 6, 6, -1], [2, 4, 6, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    whole = staleness_stats(versions, mask, 6)
    a, b, calls = split_run(staleness_stats, (versions[:1], mask[:1], 6), (versions[1:], mask[1:], 6))
    assert calls == [1, 1]
    for key in whole:
        if key.endswith("_max"):
            assert max(a[key], b[key]) == whole[key] == 4.0
        else:
            assert a[key] == pytest.approx(whole[key], abs=1e-12) and b[key] == pytest.approx(whole[key], abs=1e-12)


def test_staleness_stats_refuses_bad_input():
    mask = torch.ones(1, 2)
    with pytest.raises(ValueError, match="newer than current_version=6"):
        staleness_stats(torch.tensor([[6, 7]]), mask, 6)
    with pytest.raises(ValueError, match="integer tensor"):
        staleness_stats(torch.tensor([[6.0, 5.0]]), mask, 6)
    with pytest.raises(ValueError, match="same"):
        staleness_stats(torch.tensor([[6, 5, 4]]), mask, 6)
