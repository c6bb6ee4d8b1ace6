"""Masked statistics (reinforcepp/core/stats.py): hand values, padding, reduce hook."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import (
    all_reduce_sum,
    masked_mean,
    masked_mean_var,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_whiten,
)
from reinforcepp.core.stats import identity_reduce

EXACT = dict(atol=1e-6, rtol=0)
BIG = 1e6  # planted in padded positions: it must never reach a statistic

# Real values 1, 2, 3 (padding holds 1e6).
X = torch.tensor([[1.0, 2.0, BIG], [3.0, BIG, BIG]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_sum_hand():
    # 1 + 2 + 3 = 6, float64 scalar
    s = masked_sum(X, M)
    assert s.dtype == torch.float64 and s.dim() == 0
    assert float(s) == 6.0


def test_masked_mean_hand():
    # (1 + 2 + 3) / 3 = 2
    assert_close(masked_mean(X, M), torch.tensor(2.0), **EXACT)


def test_masked_var_is_population_variance():
    # mu = 2; ((1-2)^2 + (2-2)^2 + (3-2)^2) / 3 = 2/3   (not the sample variance 2/2 = 1)
    assert_close(masked_var(X, M), torch.tensor(2.0 / 3.0), **EXACT)
    mu, var = masked_mean_var(X, M)
    assert_close(mu, torch.tensor(2.0), **EXACT)
    assert_close(var, torch.tensor(2.0 / 3.0), **EXACT)


def test_masked_whiten_hand():
    # (x - 2) / sqrt(2/3): 1 -> -sqrt(3/2) = -1.2247449, 2 -> 0, 3 -> +1.2247449; padding -> 0
    s = math.sqrt(1.5)
    assert_close(masked_whiten(X, M), torch.tensor([[-s, 0.0, 0.0], [s, 0.0, 0.0]]), **EXACT)


def test_masked_whiten_without_shift_only_scales():
    # x / sqrt(2/3): [1, 2, 3] * 1.2247449
    s = math.sqrt(1.5)
    assert_close(masked_whiten(X, M, shift_mean=False), torch.tensor([[s, 2 * s, 0.0], [3 * s, 0.0, 0.0]]), **EXACT)


def test_masked_whiten_variance_floor():
    # Constant values: var = 0 -> floored at eps = 1e-8, scale 1/sqrt(1e-8) = 1e4. Centred: 0 (no NaN).
    x = torch.tensor([[5.0, 5.0, BIG]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert_close(masked_whiten(x, m), torch.zeros(1, 3), **EXACT)
    assert_close(masked_whiten(x, m, shift_mean=False), torch.tensor([[5e4, 5e4, 0.0]]), atol=1e-2, rtol=0)
    assert_close(masked_whiten(x, m, shift_mean=False, eps=0.25), torch.tensor([[10.0, 10.0, 0.0]]), **EXACT)


def test_masked_whiten_accepts_bool_mask_and_keeps_dtype():
    s = math.sqrt(1.5)
    out = masked_whiten(X.double(), M.bool())
    assert out.dtype == torch.float64
    assert_close(out, torch.tensor([[-s, 0.0, 0.0], [s, 0.0, 0.0]], dtype=torch.float64), **EXACT)


def test_sequence_whiten_hand():
    # [0, 0, 4, 4]: mean 2, population var ((4+4+4+4)/4) = 4, std 2 -> [-1, -1, 1, 1]
    assert_close(sequence_whiten(torch.tensor([0.0, 0.0, 4.0, 4.0])), torch.tensor([-1.0, -1.0, 1.0, 1.0]), **EXACT)


def test_padding_never_leaks():
    clean = X.masked_fill(M == 0, 0.0)
    for fn in (masked_mean, masked_var, masked_whiten):
        assert_close(fn(X, M), fn(clean, M), atol=0, rtol=0)
    assert float(masked_sum(X, M)) == float(masked_sum(clean, M))


def test_all_zero_mask_raises():
    with pytest.raises(ValueError, match="all-zero"):
        masked_mean(X, torch.zeros_like(M))
    with pytest.raises(ValueError):
        masked_whiten(X, torch.zeros_like(M))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        masked_mean(X, M[:, :2])


def test_single_process_reductions_are_identity():
    sums = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert identity_reduce(sums) is sums
    assert not torch.distributed.is_initialized()
    assert_close(all_reduce_sum(sums), sums, atol=0, rtol=0)


def _halves():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, generator=g) * 3 + 1
    lengths = torch.tensor([7, 1, 3, 5, 2, 6])
    m = (torch.arange(7)[None, :] < lengths[:, None]).float()
    x = torch.where(m.bool(), x, torch.full_like(x, BIG))
    # Unequal halves: 11 tokens vs 13 tokens, so averaging the two halves' means is wrong.
    return x, m, (x[:3], m[:3]), (x[3:], m[3:])


@pytest.mark.parametrize("fn", [masked_sum, masked_mean, masked_var])
def test_scalar_stats_whole_batch_equals_two_halves(split_run, fn):
    x, m, a, b = _halves()
    r0, r1, calls = split_run(fn, a, b)
    assert_close(r0, fn(x, m), **EXACT)
    assert_close(r1, fn(x, m), **EXACT)
    assert calls[0] == calls[1] >= 1


def test_masked_whiten_whole_batch_equals_two_halves(split_run):
    x, m, a, b = _halves()
    w0, w1, calls = split_run(masked_whiten, a, b)
    assert_close(torch.cat([w0, w1]), masked_whiten(x, m), **EXACT)
    assert calls == [2, 2]  # mean first, then the sum of squared deviations
    # ... and the check can fail: whitening each half on its own gives other numbers.
    local = torch.cat([masked_whiten(*a), masked_whiten(*b)])
    assert (local - masked_whiten(x, m)).abs().max() > 1e-2


def test_averaging_per_half_means_would_be_wrong():
    x, m, a, b = _halves()
    naive = (masked_mean(*a) + masked_mean(*b)) / 2
    assert abs(float(naive) - float(masked_mean(x, m))) > 1e-3


def test_sequence_whiten_whole_batch_equals_two_halves(split_run):
    x = torch.tensor([3.0, -1.0, 0.5, 7.0, 2.0])
    w0, w1, _ = split_run(sequence_whiten, (x[:2],), (x[2:],))
    assert_close(torch.cat([w0, w1]), sequence_whiten(x), **EXACT)
