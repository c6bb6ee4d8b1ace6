"""The sampler/trainer mismatch: measuring it, and truncated importance sampling (TIS).

A fast inference engine (vLLM) samples from numerically different code than the training
model's forward pass: other kernels, other batch shapes, sometimes another precision. The
tokens of a rollout are then drawn from a behaviour policy ``mu`` (the sampler) that is close
to, but not the same as, the policy ``pi_old`` whose log-probs the trainer recomputes
(``old_logprobs``). The clipped surrogate corrects for ``pi / pi_old`` only; truncated
importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"; OpenRLHF ``tis``, verl ``rollout_is``) corrects the remaining
``pi_old / mu`` with a capped, gradient-free weight per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .correction import rollout_correction
from .stats import Reduce, _reduced


def truncated_importance_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, cap: float) -> Tensor:
    """Per-token TIS weight ``w = min(exp(old_logprobs - sampler_logprobs), cap)``.

    The special case ``level="token"``, ``mode="truncate"``, ``high=cap`` of
    :func:`~reinforcepp.core.correction.rollout_correction`, over every position (no mask):
    computed as ``exp(min(old_logprobs - sampler_logprobs, log cap))`` so that it never
    overflows; the result carries no gradient. The trainer multiplies each token's
    policy-gradient loss by ``w`` (before aggregation); KL and entropy terms are not weighted.

    Args:
        old_logprobs: ``(N, T)`` log-probs of the sampled tokens recomputed by the trainer.
        sampler_logprobs: ``(N, T)`` log-probs the sampler drew them with.
        cap: ``C > 0``, finite; ``w <= C``.

    Returns:
        ``(N, T)`` float32 weights in ``(0, cap]`` (0 only where ``old_logprobs`` is ``-inf``).
    """
    if not cap > 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    if old_logprobs.shape != sampler_logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} and sampler_logprobs "
                         f"{tuple(sampler_logprobs.shape)} differ in shape")
    everywhere = torch.ones(old_logprobs.shape, dtype=torch.bool, device=old_logprobs.device)
    return rollout_correction(old_logprobs, sampler_logprobs, everywhere, "truncate", "token", high=cap).weights.float()


def logprob_mismatch(
    old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, reduce: Reduce | None = None
) -> tuple[float, float]:
    """Mean and max of ``|old_logprobs - sampler_logprobs|`` over real tokens.

    ``(N, T)`` each -> ``(mean, max)``; the mean is exact over the global batch with a
    ``reduce`` hook, the max is this process's (take the max over ranks when combining).
    ``(0.0, 0.0)`` when the mask has no real token.
    """
    m = mask.double()
    diff = (old_logprobs.detach().double() - sampler_logprobs.detach().double()).abs()
    diff = torch.where(m > 0, diff, torch.zeros_like(diff))  # padding may hold anything, even inf
    s, n = _reduced([diff.sum(), m.sum()], reduce)  # every rank takes part, with or without tokens
    return (float(s / n) if n > 0 else 0.0), float(diff.max()) if diff.numel() else 0.0
