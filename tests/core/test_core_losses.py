"""Policy loss, KL loss, value loss, entropy and loss aggregation (docs/algorithms.md, "The policy loss")."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import LOSS_AGGS, aggregate, entropy_from_logits, kl_loss, policy_loss, value_loss

EXACT = dict(atol=1e-6, rtol=0)
BIG = 1e6
F64 = torch.float64


def lr(*ratios):
    """log-ratios for the given ratios, float64, as logprobs with old_logprobs = 0."""
    return torch.tensor([[math.log(r) for r in ratios]], dtype=F64)


# --- policy_loss -------------------------------------------------------------------------------


def test_policy_loss_hand_symmetric_clip():
    # eps_low = eps_high = 0.2, clip range [0.8, 1.2];  L = max(-A r, -A clip(r))
    # tok 0: A=+1, r=1.5: max(-1.5, -1.2) = -1.2   (upper clip binds)
    # tok 1: A=-1, r=0.5: max( 0.5,  0.8) =  0.8   (lower clip binds)
    # tok 2: A=-1, r=1.5: max( 1.5,  1.2) =  1.5   (no clip: the pessimistic side is unclipped)
    # tok 3: A=+1, r=0.5: max(-0.5, -0.8) = -0.5   (no clip)
    # tok 4: A=+2, r=1.0: -2;  tok 5: A=-2, r=1.0: 2
    logp = lr(1.5, 0.5, 1.5, 0.5, 1.0, 1.0)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0, -2.0]], dtype=F64)
    out = policy_loss(logp, torch.zeros_like(logp), adv)
    assert_close(out.loss, torch.tensor([[-1.2, 0.8, 1.5, -0.5, -2.0, 2.0]], dtype=F64), **EXACT)
    assert_close(out.ratio, torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.0, 1.0]], dtype=F64), **EXACT)
    assert out.clipped_high.tolist() == [[True, False, False, False, False, False]]
    assert out.clipped_low.tolist() == [[False, True, False, False, False, False]]


def test_policy_loss_hand_asymmetric_clip_higher():
    # DAPO clip-higher: eps_low 0.2, eps_high 0.28, clip range [0.8, 1.28]
    # A=+1, r=1.25: max(-1.25, -1.25) = -1.25 (inside; the symmetric clip would give -1.2)
    # A=+1, r=1.5:  max(-1.5, -1.28) = -1.28 (upper clip binds)
    # A=-1, r=0.7:  max(0.7, 0.8) = 0.8      (lower clip binds)
    # A=-1, r=0.9:  0.9
    logp = lr(1.25, 1.5, 0.7, 0.9)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=F64)
    out = policy_loss(logp, torch.zeros_like(logp), adv, eps_low=0.2, eps_high=0.28)
    assert_close(out.loss, torch.tensor([[-1.25, -1.28, 0.8, 0.9]], dtype=F64), **EXACT)
    assert out.clipped_high.tolist() == [[False, True, False, False]]
    assert out.clipped_low.tolist() == [[False, False, True, False]]
    sym = policy_loss(logp, torch.zeros_like(logp), adv)
    assert_close(sym.loss[0, 0], torch.tensor(-1.2, dtype=F64), **EXACT)


def test_policy_loss_hand_dual_clip():
    # dual clip c = 3, where A < 0: L = min(L, -c A)
    # A=-1,   r=4:  L = max(4, 1.2) = 4     -> min(4, 3) = 3
    # A=-1,   r=2:  L = 2                   -> min(2, 3) = 2
    # A=-0.5, r=10: L = max(5, 0.6) = 5     -> min(5, 1.5) = 1.5
    # A=+1,   r=10: L = max(-10, -1.2) = -1.2 (A > 0: untouched)
    logp = lr(4.0, 2.0, 10.0, 10.0)
    adv = torch.tensor([[-1.0, -1.0, -0.5, 1.0]], dtype=F64)
    out = policy_loss(logp, torch.zeros_like(logp), adv, dual_clip=3.0)
    assert_close(out.loss, torch.tensor([[3.0, 2.0, 1.5, -1.2]], dtype=F64), **EXACT)
    no_dual = policy_loss(logp, torch.zeros_like(logp), adv)
    assert_close(no_dual.loss, torch.tensor([[4.0, 2.0, 5.0, -1.2]], dtype=F64), **EXACT)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, torch.zeros_like(logp), adv, dual_clip=1.0)


def test_policy_loss_ratio_is_clamped():
    # log-ratio clamped to [-20, 20] before exp: 30 -> e^20, -40 -> e^-20
    logp = torch.tensor([[30.0, -40.0]], dtype=F64)
    out = policy_loss(logp, torch.zeros_like(logp), torch.tensor([[1.0, 1.0]], dtype=F64))
    assert_close(out.ratio, torch.tensor([[math.exp(20.0), math.exp(-20.0)]], dtype=F64), atol=0, rtol=1e-12)
    assert torch.isfinite(out.loss).all()


def test_policy_loss_gradient_hand():
    # dL/dlogp = -A r where the unclipped term is taken, 0 where a clip binds.
    # Same tokens as the symmetric example: [clipped, clipped, -(-1)*1.5, -(1)*0.5, -2*1, 2*1]
    logp = lr(1.5, 0.5, 1.5, 0.5, 1.0, 1.0).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0, -2.0]], dtype=F64)
    policy_loss(logp, torch.zeros_like(logp), adv).loss.sum().backward()
    assert_close(logp.grad, torch.tensor([[0.0, 0.0, 1.5, -0.5, -2.0, 2.0]], dtype=F64), **EXACT)


def test_on_policy_loss_is_minus_mean_advantage_but_gradient_is_not_zero():
    # One update per batch: ratio == 1, so L = -A per token and token-mean(L) = -mean(A) = 0 after whitening;
    # the gradient is dL/dlogp = -A / num_tokens per token, not zero.
    adv = torch.tensor([[2.0, 0.0, 0.0, 0.0], [-0.5, -0.5, -0.5, -0.5]], dtype=F64)
    m = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]], dtype=F64)
    logp = torch.full((2, 4), -1.3, dtype=F64, requires_grad=True)
    loss = aggregate(policy_loss(logp, logp.detach(), adv).loss, m)
    assert abs(float(loss.detach())) < 1e-12
    loss.backward()
    assert_close(logp.grad, -adv * m / 5, **EXACT)


def _smooth_batch(seed: int, n: int = 4, t: int = 5):
    """Ratios in every region of the clipped objective (below 1 - eps_low, inside, between
    1 + 0.2 and 1 + 0.28, above 1 + eps_high, beyond the dual clip c = 3), each with both signs of
    the advantage, all at least 0.03 away from the kinks at 0.8, 1.2, 1.28 and 3."""
    g = torch.Generator().manual_seed(seed)
    ratios = torch.tensor([0.6, 0.7, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 6.0], dtype=F64).repeat(2)
    signs = torch.tensor([1.0] * 10 + [-1.0] * 10, dtype=F64)
    perm = torch.randperm(n * t, generator=g)
    logr = ratios[perm].log().view(n, t)
    adv = (signs[perm] * (0.3 + torch.rand(n * t, generator=g, dtype=F64))).view(n, t)
    old = torch.randn(n, t, generator=g, dtype=F64) - 2
    lengths = torch.tensor([t, 1, 3, 4][:n])
    m = (torch.arange(t)[None] < lengths[:, None]).to(F64)
    return old + logr, old, adv, m


@pytest.mark.parametrize("mode", LOSS_AGGS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_gradient_matches_finite_differences(mode, dual_clip):
    logp, old, adv, m = _smooth_batch(0)

    def f(lp):
        return aggregate(policy_loss(lp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip).loss, m, mode)

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),), eps=1e-6, atol=1e-8, rtol=1e-6)


# --- kl_loss, entropy, value loss --------------------------------------------------------------


def test_kl_loss_with_coefficient_aggregates_like_the_policy_loss():
    # k3 at x = logp - ref = [1 | 0, -2]; mask [[1, 0], [1, 1]]
    # k3(1) = e^-1 = 0.3678794; k3(0) = 0; k3(-2) = e^2 - 3 = 4.3890561
    # beta = 0.1, token-mean: 0.1 * (0.3678794 + 0 + 4.3890561) / 3 = 0.1585645
    logp = torch.tensor([[0.0, BIG], [-1.0, -3.0]])
    ref = torch.tensor([[-1.0, 0.0], [-1.0, -1.0]])
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = aggregate(0.1 * kl_loss(logp, ref, "k3"), m)
    assert_close(out, torch.tensor(0.1 * (math.exp(-1) + math.exp(2) - 3) / 3), **EXACT)


def test_entropy_from_logits_hand():
    # [0, 0]: uniform over 2 -> ln 2 = 0.6931472
    # [0, ln 3]: p = [1/4, 3/4] -> -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    # [5, 5, 5, 5] -> ln 4 (shift invariance);  [100, 0, 0] -> ~ 0 (no NaN)
    two = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    assert_close(entropy_from_logits(two), torch.tensor([math.log(2.0), 0.5623351446188083]), **EXACT)
    assert_close(entropy_from_logits(torch.full((4,), 5.0)), torch.tensor(math.log(4.0)), **EXACT)
    assert_close(entropy_from_logits(torch.tensor([100.0, 0.0, 0.0])), torch.tensor(0.0), **EXACT)


def test_entropy_shapes_and_dtype():
    logits = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    h = entropy_from_logits(logits)
    assert h.shape == (2, 3) and h.dtype == torch.float32
    assert_close(h, torch.full((2, 3), math.log(8.0)), **EXACT)


def test_value_loss_hand():
    # old V = 1, eps 0.2 -> clipped V in [0.8, 1.2]; loss = 0.5 max((V - R)^2, (V_clip - R)^2)
    # V=1.5, R=2: max(0.25, (1.2-2)^2 = 0.64) = 0.64 -> 0.32
    # V=0.5, R=0: max(0.25, (0.8-0)^2 = 0.64) = 0.64 -> 0.32
    # V=1.1, R=2: inside the range: 0.81 -> 0.405
    # V=3.0, R=2: max(1.0, (1.2-2)^2 = 0.64) = 1.0 -> 0.5
    v = torch.tensor([[1.5, 0.5, 1.1, 3.0]], dtype=F64)
    old = torch.ones_like(v)
    ret = torch.tensor([[2.0, 0.0, 2.0, 2.0]], dtype=F64)
    assert_close(value_loss(v, old, ret), torch.tensor([[0.32, 0.32, 0.405, 0.5]], dtype=F64), **EXACT)
    # unclipped: 0.5 (V - R)^2 = [0.125, 0.125, 0.405, 0.5]
    assert_close(value_loss(v, old, ret, clip_eps=None), torch.tensor([[0.125, 0.125, 0.405, 0.5]], dtype=F64), **EXACT)


def test_value_loss_gradient_is_zero_where_the_clipped_branch_wins():
    # V=1.5 (clipped branch wins -> no gradient), V=3 (unclipped wins: d/dV 0.5 (V-R)^2 = V - R = 1)
    v = torch.tensor([[1.5, 3.0]], dtype=F64, requires_grad=True)
    value_loss(v, torch.ones(1, 2, dtype=F64), torch.tensor([[2.0, 2.0]], dtype=F64)).sum().backward()
    assert_close(v.grad, torch.tensor([[0.0, 1.0]], dtype=F64), **EXACT)


# --- aggregate ------------------------------------------------------------------------------------

# Per-token losses: row 0 = [1, 2, 3] (3 tokens), row 1 = [4] (1 token); padding holds 1e6.
L = torch.tensor([[1.0, 2.0, 3.0, BIG], [4.0, BIG, BIG, BIG]])
ML = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])


def test_aggregate_hand():
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert_close(aggregate(L, ML, "token-mean"), torch.tensor(2.5), **EXACT)
    # seq-mean-token-mean: (6/3 + 4/1) / 2 = 3
    assert_close(aggregate(L, ML, "seq-mean-token-mean"), torch.tensor(3.0), **EXACT)
    # seq-mean-token-sum: (6 + 4) / 2 = 5
    assert_close(aggregate(L, ML, "seq-mean-token-sum"), torch.tensor(5.0), **EXACT)
    # seq-mean-token-sum-norm: (6 + 4) / (2 sequences * 4 = padded length) = 1.25; with max length 10: 10 / 20 = 0.5
    assert_close(aggregate(L, ML, "seq-mean-token-sum-norm"), torch.tensor(1.25), **EXACT)
    assert_close(aggregate(L, ML, "seq-mean-token-sum-norm", max_response_length=10), torch.tensor(0.5), **EXACT)


def test_aggregate_default_is_token_mean():
    assert_close(aggregate(L, ML), torch.tensor(2.5), **EXACT)


def test_aggregate_with_window_counts_hand():
    # this batch is part of a window of 8 tokens / 5 sequences:
    # token-mean 10 / 8 = 1.25; seq-mean-token-mean (2 + 4) / 5 = 1.2; seq-mean-token-sum 10 / 5 = 2;
    # seq-mean-token-sum-norm 10 / (5 * 10) = 0.2
    assert_close(aggregate(L, ML, "token-mean", num_tokens=8), torch.tensor(1.25), **EXACT)
    assert_close(aggregate(L, ML, "seq-mean-token-mean", num_sequences=5), torch.tensor(1.2), **EXACT)
    assert_close(aggregate(L, ML, "seq-mean-token-sum", num_sequences=5), torch.tensor(2.0), **EXACT)
    assert_close(
        aggregate(L, ML, "seq-mean-token-sum-norm", num_sequences=5, max_response_length=10), torch.tensor(0.2), **EXACT
    )


def test_aggregate_errors():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate(L, ML, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="all-zero"):
        aggregate(L, torch.zeros_like(ML), "token-mean")
    with pytest.raises(ValueError, match="all-zero"):
        aggregate(L, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]), "seq-mean-token-mean")


def _window(seed=0, n=8, t=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    m = (torch.arange(t)[None] < lengths[:, None]).to(F64)
    old = torch.randn(n, t, generator=g, dtype=F64) - 2
    logp = old + 0.3 * torch.randn(n, t, generator=g, dtype=F64)
    adv = torch.randn(n, t, generator=g, dtype=F64)
    logp = torch.where(m.bool(), logp, torch.full_like(logp, BIG))  # garbage in the padding
    return logp, old, adv, m


@pytest.mark.parametrize("mode", LOSS_AGGS)
@pytest.mark.parametrize("trim", [False, True])
def test_k_micro_batches_equal_one_batch(mode, trim):
    # The window's counts are passed to every micro-batch; the micro-batch losses then add up to the
    # window's loss and so do the gradients. trim=True drops each micro-batch's trailing all-padding
    # columns (dynamic padding), which is why the max response length must be passed explicitly.
    logp, old, adv, m = _window()
    n, t = m.shape
    counts = dict(num_tokens=float(m.sum()), num_sequences=n, max_response_length=t)

    lp_full = logp.clone().requires_grad_(True)
    full = aggregate(policy_loss(lp_full, old, adv).loss, m, mode, max_response_length=t)
    full.backward()

    lp = logp.clone().requires_grad_(True)
    total = torch.zeros((), dtype=F64)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):  # K = 3 uneven micro-batches
        width = int(m[rows].sum(-1).max()) if trim else t
        cols = slice(0, width)
        token_loss = policy_loss(lp[rows, cols], old[rows, cols], adv[rows, cols]).loss
        part = aggregate(token_loss, m[rows, cols], mode, **counts)
        part.backward()
        total = total + part.detach()
    assert_close(total, full.detach(), atol=1e-12, rtol=0)
    assert_close(lp.grad, lp_full.grad, atol=1e-12, rtol=0)


def test_micro_batches_without_window_counts_would_be_wrong():
    # The check can fail: averaging per-micro-batch token-means is not the window's token-mean.
    logp, old, adv, m = _window()
    loss = policy_loss(logp, old, adv).loss
    naive = (aggregate(loss[:3], m[:3]) + aggregate(loss[3:], m[3:])) / 2
    assert abs(float(naive - aggregate(loss, m))) > 1e-3


def test_token_mean_whole_batch_equals_two_halves_with_reduce(split_run):
    # Two "ranks" all-reduce their token counts, then each divides its own sum by the global count;
    # the per-rank losses add up to the whole-batch loss (under DDP, which averages gradients over
    # ranks, each rank would multiply its loss by the world size).
    logp, old, adv, m = _window()
    loss = policy_loss(logp, old, adv).loss

    def rank_loss(token_loss, mk, reduce):
        n_tokens = reduce(mk.sum().reshape(1).double())[0]
        return aggregate(token_loss, mk, "token-mean", num_tokens=n_tokens)

    a, b, calls = split_run(rank_loss, (loss[:5], m[:5]), (loss[5:], m[5:]))
    assert calls == [1, 1]
    assert_close(a + b, aggregate(loss, m), atol=1e-12, rtol=0)
    # and the same with plain sums fed through a reduce function by hand
    sums = torch.stack([m[:5].sum(), m[5:].sum()])
    reduce = lambda s: s + sums.sum() - s  # noqa: E731  (each part's count -> the global count)
    total = sum(aggregate(loss[r], m[r], num_tokens=reduce(m[r].sum())) for r in (slice(0, 5), slice(5, 8)))
    assert_close(total, aggregate(loss, m), atol=1e-12, rtol=0)


def test_padding_never_leaks_into_the_loss():
    logp, old, adv, m = _window()
    clean = torch.where(m.bool(), logp, torch.zeros_like(logp))
    adv_big = torch.where(m.bool(), adv, torch.full_like(adv, BIG))
    for mode in LOSS_AGGS:
        a = aggregate(policy_loss(logp, old, adv_big).loss, m, mode)
        b = aggregate(policy_loss(clean, old, adv).loss, m, mode)
        assert torch.isfinite(a) and abs(float(a - b)) < 1e-12, mode
