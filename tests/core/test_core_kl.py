"""KL estimators (docs/algorithms.md, "KL to the reference"): hand values, clamping, dtype, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import KL_ESTIMATORS, KL_PLACEMENTS, check_kl_placement, kl_loss, kl_penalty

EXACT = dict(atol=1e-6, rtol=0)

# x = logprobs - ref_logprobs = [1, -2, 0]
LOGP = torch.tensor([[-0.5, -3.0, -1.0]])
REF = torch.tensor([[-1.5, -1.0, -1.0]])

HAND = {
    # k1 = x
    "k1": [1.0, -2.0, 0.0],
    # k2 = x^2 / 2 = [1/2, 4/2, 0]
    "k2": [0.5, 2.0, 0.0],
    # k3 = exp(-x) - 1 + x: exp(-1) - 1 + 1 = 0.36787944; exp(2) - 1 - 2 = 7.3890561 - 3 = 4.3890561; 1 - 1 + 0 = 0
    "k3": [math.exp(-1.0), math.exp(2.0) - 3.0, 0.0],
    # abs = |x|
    "abs": [1.0, 2.0, 0.0],
}


def test_the_five_estimators_are_registered():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "abs", "k3+"}
    assert set(KL_PLACEMENTS) == {"reward", "loss", "none"}


@pytest.mark.parametrize("name", sorted(HAND))
def test_kl_penalty_hand_values(name):
    out = kl_penalty(LOGP, REF, name)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([HAND[name]]), **EXACT)


def test_kl_default_estimator_is_k3():
    assert_close(kl_penalty(LOGP, REF), torch.tensor([HAND["k3"]]), **EXACT)


@pytest.mark.parametrize(
    "name, expected",
    [
        # x = [12, -12, -100]
        # k1: [12 -> 10, -12 -> -10, -100 -> -10]
        ("k1", [10.0, -10.0, -10.0]),
        # k2: [72 -> 10, 72 -> 10, 5000 -> 10]
        ("k2", [10.0, 10.0, 10.0]),
        # k3: exp(-12) - 1 + 12 = 11.000006 -> 10; exp(12) - 13 = 162741.8 -> 10;
        #     exp(100) overflows float32 (inf) unless x is bounded first -> must still be 10
        ("k3", [10.0, 10.0, 10.0]),
        # abs: [12, 12, 100] -> 10
        ("abs", [10.0, 10.0, 10.0]),
    ],
)
def test_kl_penalty_is_clamped_to_plus_minus_10(name, expected):
    logp = torch.tensor([[-0.5, -12.5, -100.0]])
    ref = torch.tensor([[-12.5, -0.5, 0.0]])
    out = kl_penalty(logp, ref, name)
    assert torch.isfinite(out).all()
    assert_close(out, torch.tensor([expected]), **EXACT)


@pytest.mark.parametrize("name", sorted(HAND))
def test_bf16_inputs_give_float32_output(name):
    # -0.5, -1.5, -3, -1 are exact in bfloat16, so the float32 result is the hand value exactly.
    out = kl_penalty(LOGP.bfloat16(), REF.bfloat16(), name)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([HAND[name]]), **EXACT)


def test_bf16_difference_is_taken_in_float32():
    # logp = 1 + 2^-7 (exact in bf16), ref = 1, x = 2^-7. k2 = x^2 / 2 = 2^-15 (exact in float32;
    # bf16 arithmetic would also hold it, but the output dtype must be float32 all the same).
    logp = torch.tensor([[1.0078125]], dtype=torch.bfloat16)
    ref = torch.tensor([[1.0]], dtype=torch.bfloat16)
    assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[2.0**-15]]), atol=1e-12, rtol=0)


def test_unknown_estimator_and_shape_mismatch_raise():
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(LOGP, REF, "k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ in shape"):
        kl_penalty(LOGP, REF[:, :2])


def test_check_kl_placement():
    for p in ("reward", "loss", "none"):
        assert check_kl_placement(p) == p
    with pytest.raises(ValueError, match="reward, loss, none"):
        check_kl_placement("both")


@pytest.mark.parametrize(
    "name, grad",
    [
        # d/dlogp of the estimator at x = [1, -2, 0]:
        # k1: 1
        ("k1", [1.0, 1.0, 1.0]),
        # k2: x
        ("k2", [1.0, -2.0, 0.0]),
        # k3: 1 - exp(-x) = [1 - e^-1, 1 - e^2, 0]
        ("k3", [1.0 - math.exp(-1.0), 1.0 - math.exp(2.0), 0.0]),
        # abs: sign(x) (0 at 0 by torch's convention)
        ("abs", [1.0, -1.0, 0.0]),
    ],
)
def test_kl_loss_equals_penalty_and_has_gradient(name, grad):
    logp = LOGP.clone().requires_grad_(True)
    out = kl_loss(logp, REF, name)
    assert_close(out.detach(), kl_penalty(LOGP, REF, name), atol=0, rtol=0)
    out.sum().backward()
    assert_close(logp.grad, torch.tensor([grad]), **EXACT)


def test_kl_loss_gradient_is_zero_where_clamped():
    # x = 12: k1 = 12 is clamped to 10, so the loss no longer depends on logp there.
    logp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    ref = torch.tensor([[-12.5, -1.5]])
    kl_loss(logp, ref, "k1").sum().backward()
    assert_close(logp.grad, torch.tensor([[0.0, 1.0]]), **EXACT)
