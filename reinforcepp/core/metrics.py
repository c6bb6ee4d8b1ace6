"""Metric helpers: what the trainers log besides the loss. All return Python floats or float
scalars, computed over real tokens only (and globally with a ``reduce`` hook)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .shaping import group_view
from .stats import Reduce, masked_mean, masked_mean_var


def clip_fractions(
    clipped_low: Tensor, clipped_high: Tensor, mask: Tensor, reduce: Optional[Reduce] = None
) -> tuple[float, float]:
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


def group_reward_stats(rewards: Tensor, samples_per_prompt: int, tol: float = 1e-6) -> dict[str, float]:
    """How much a group baseline has to work with. ``rewards`` ``(N,)``, prompt by prompt.

    ``reward/uniform_groups``: the fraction of groups with ``max_j R_j - min_j R_j <= tol`` (a group
    baseline gives them advantage 0); ``reward/group_std_mean``: ``mean_g std_g``, the sample
    (ddof=1) std GRPO divides by. Groups (1, 1, 1, 1) and (0, 1, 0, 1): 0.5 and
    ``(0 + sqrt(1/3)) / 2 = 0.2887``.
    """
    g = group_view(rewards.double(), samples_per_prompt)
    uniform = (g.amax(1) - g.amin(1)) <= tol
    return {"reward/uniform_groups": float(uniform.double().mean()), "reward/group_std_mean": float(g.std(1).mean())}


def kl_return_share(rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> float:
    """How much of the return the KL penalty makes up, with the KL in the reward (gamma = 1):

        share = |beta * mean_i sum_t kl[i,t]| / (|beta * mean_i sum_t kl[i,t]| + mean_i |r_i|)

    ``rewards`` ``(N,)`` the task rewards, ``kl`` ``(N, T)`` per-token KL estimates, ``mask``
    ``(N, T)``. 0 with no KL; above 0.5 the penalty outweighs the task reward, and the policy
    gains more by staying near the reference than by solving the task. The KL is averaged over
    the batch before its magnitude is taken: k1 is negative on some samples, positive in mean."""
    kl_part = abs(kl_coef * float((kl.float() * mask.float()).sum(-1).mean()))
    reward_part = float(rewards.float().abs().mean())
    total = kl_part + reward_part
    return kl_part / total if total > 0 else 0.0


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
