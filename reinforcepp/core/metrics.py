"""Metric helpers: what the trainers log besides the loss. All return Python floats or float
scalars, computed over real tokens only (and globally with a ``reduce`` hook)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .stats import Reduce, masked_mean, masked_mean_var


def clip_fractions(clipped_low: Tensor, clipped_high: Tensor, mask: Tensor, reduce: Optional[Reduce] = None) -> tuple[float, float]:
    """Fraction of real tokens whose lower clip binds and whose upper clip binds (see
    :class:`~reinforcepp.core.losses.PolicyLoss`). ``(N, T)`` each -> ``(low, high)``."""
    m = mask.float()
    return float(masked_mean(clipped_low.float(), m, reduce)), float(masked_mean(clipped_high.float(), m, reduce))


def approx_kl(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, reduce: Optional[Reduce] = None) -> float:
    """KL(old || current) estimated with k3 on tokens sampled from the old policy:
    ``mean((ratio - 1) - log ratio)``, ``ratio = exp(logp - old_logp)``. 0 when on-policy."""
    log_ratio = (logprobs.detach() - old_logprobs).float().clamp(-20, 20)
    return float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask.float(), reduce))


def advantage_stats(advantages: Tensor, mask: Tensor, reduce: Optional[Reduce] = None) -> dict[str, float]:
    """Advantage mean/std, token-weighted (every real token counts once: what whitening
    zeroes) and sample-weighted (each response's mean advantage counts once). After global
    token-weighted whitening the token-weighted mean is 0 and the sample-weighted one is not."""
    m = mask.float()
    tok_mu, tok_var = masked_mean_var(advantages.float(), m, reduce)
    per_seq = (advantages.float() * m).sum(-1) / m.sum(-1).clamp_min(1)
    has_tokens = (m.sum(-1) > 0).float()
    seq_mu, seq_var = masked_mean_var(per_seq, has_tokens, reduce)
    return {
        "advantage/mean_token": float(tok_mu),
        "advantage/std_token": float(tok_var.sqrt()),
        "advantage/mean_sample": float(seq_mu),
        "advantage/std_sample": float(seq_var.sqrt()),
    }


def pass_at_k(num_samples: int, num_correct: Tensor, k: int) -> Tensor:
    """Unbiased pass@k (Chen et al. 2021, arXiv 2107.03374, eq. 1) per problem:
    ``1 - C(n - c, k) / C(n, k)`` for ``n`` samples of which ``c`` are correct, computed as
    ``1 - prod_{j = n - c + 1}^{n} (1 - k / j)`` (no large binomials). It is 1 when
    ``n - c < k``. With ``k = n`` it equals "any of the n samples is correct"; with ``k = 1``
    it is ``c / n``. ``num_correct``: ``(P,)`` integers -> ``(P,)`` float64.
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n = {num_samples}, got k={k}")
    c = num_correct.to(torch.int64)
    if bool(((c < 0) | (c > num_samples)).any()):
        raise ValueError(f"num_correct must be in [0, {num_samples}]")
    out = torch.ones(c.shape, dtype=torch.float64)
    for p, cp in enumerate(c.flatten().tolist()):
        if num_samples - cp >= k:
            j = torch.arange(num_samples - cp + 1, num_samples + 1, dtype=torch.float64)
            out.view(-1)[p] = 1.0 - torch.prod(1.0 - k / j)
    return out
