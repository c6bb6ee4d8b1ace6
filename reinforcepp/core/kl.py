"""Per-token KL estimators between two policies, computed from sampled-token log-probs.

With ``x = logprobs - ref_logprobs`` (log pi(a|s) - log pi_ref(a|s), the action sampled from pi):

* ``k1 = x``                 unbiased, high variance, can be negative
* ``k2 = x**2 / 2``          biased, low variance, non-negative
* ``k3 = exp(-x) - 1 + x``   unbiased for KL(pi || pi_ref), non-negative, low variance
* ``abs = |x|``
* ``k3+``: the value of k3 with the gradient of k2 (verl's ``low_var_kl+`` / ``k3+``):
  ``k2 - sg(k2) + sg(k3)``. k3's own gradient, ``(1 - exp(-x)) grad x``, is a biased gradient
  of KL(pi || pi_ref) when the tokens are sampled from pi; k2's, ``x grad x``, is the unbiased
  one (its expectation is the gradient of the reverse KL). Only meaningful in the loss.

Reference: J. Schulman, "Approximating KL divergence" (2020). Everything is computed in
float32 and clamped to [-10, 10] so that one rare token cannot dominate a batch.
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch
from torch import Tensor

KLEstimatorName = Literal["k1", "k2", "k3", "abs", "k3+"]
KLPlacement = Literal["reward", "loss", "none"]
"""Where the KL to the reference enters: the token rewards (no gradient), the loss (with
gradient), or nowhere (no reference model is loaded). Exactly one, never both."""

KL_CLAMP = 10.0

_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda x: x,
    "k2": lambda x: 0.5 * x.square(),
    "k3": lambda x: torch.expm1(-x) + x,
    "abs": lambda x: x.abs(),
}


def _k3_plus(x: Tensor) -> Tensor:
    """Value of k3, gradient of k2 (each clamped like the others)."""
    k2 = (0.5 * x.square()).clamp(-KL_CLAMP, KL_CLAMP)
    k3 = (torch.expm1(-x) + x).clamp(-KL_CLAMP, KL_CLAMP)
    return k2 - k2.detach() + k3.detach()


_ESTIMATORS["k3+"] = _k3_plus

KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimatorName)
KL_PLACEMENTS: tuple[str, ...] = get_args(KLPlacement)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimatorName = "k3") -> Tensor:
    """Per-token KL estimate, float32, clamped to [-10, 10].

    Args:
        logprobs: ``(N, T)`` log-probs of the sampled tokens under the policy (``old_logprobs``
            when the KL goes into the reward, the current ``logprobs`` when it goes into the loss).
        ref_logprobs: ``(N, T)`` log-probs of the same tokens under the reference model.
        estimator: one of ``k1``, ``k2``, ``k3``, ``abs``, ``k3+`` (see the module docstring).

    Returns:
        ``(N, T)`` float32 tensor. Padding positions carry whatever the inputs carry; mask them.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    # Clamp x as well as the result: exp(-x) overflows float32 for x < -88.
    x = (logprobs.float() - ref_logprobs.float()).clamp(-20.0, 20.0)
    return _ESTIMATORS[estimator](x).clamp(-KL_CLAMP, KL_CLAMP)


def check_kl_placement(placement: str) -> KLPlacement:
    """Return ``placement`` if it is one of ``reward``, ``loss``, ``none``; raise otherwise."""
    if placement not in KL_PLACEMENTS:
        raise ValueError(f"unknown KL placement {placement!r}; valid: {', '.join(KL_PLACEMENTS)}")
    return placement  # type: ignore[return-value]
