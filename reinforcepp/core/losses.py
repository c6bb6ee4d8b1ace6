"""Per-token losses and their aggregation (docs/algorithms.md, "The policy loss (shared by every
estimator)" and "Loss aggregation, micro-batches and ranks").

Each loss function returns a per-token ``(N, T)`` tensor; :func:`aggregate` turns it into the
scalar the optimizer sees. Aggregation takes the *window's* normalisers (token count, sequence
count) as arguments, so that the losses of K micro-batches (on R ranks) of one optimizer step
add up to exactly the loss of the whole window computed at once.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, get_args

import torch
from torch import Tensor

from .kl import KLEstimatorName, kl_penalty

ImportanceSamplingLevel = Literal["token", "sequence"]
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGGS: tuple[str, ...] = get_args(LossAgg)


class PolicyLoss(NamedTuple):
    """Per-token clipped surrogate and what the metrics need. All ``(N, T)``."""

    loss: Tensor
    ratio: Tensor
    clipped_low: Tensor
    """bool: the lower clip binds (``A < 0`` and ``ratio < 1 - eps_low``)."""
    clipped_high: Tensor
    """bool: the upper clip binds (``A > 0`` and ``ratio > 1 + eps_high``)."""


def importance_log_ratio(
    logprobs: Tensor,
    old_logprobs: Tensor,
    response_mask: Optional[Tensor] = None,
    level: ImportanceSamplingLevel = "token",
) -> Tensor:
    """Log of the importance ratio of each token, ``(N, T)``.

    * ``token`` (PPO): ``log r[i,t] = logp[i,t] - old_logp[i,t]``.
    * ``sequence`` (GSPO, arXiv 2507.18071, "GSPO-token" form, eq. 13):
      ``log s_i = (1 / |y_i|) sum_t m[i,t] (logp[i,t] - old_logp[i,t])`` (the length-normalised
      sequence ratio) and ``log r[i,t] = sg(log s_i) + logp[i,t] - sg(logp[i,t])``: every token
      of response ``i`` carries the value ``s_i``, its gradient is ``s_i grad logp[i,t]``. With
      one advantage per response this is exactly GSPO's sequence objective (and TRL's
      ``importance_sampling_level="sequence"``, which lets the gradient flow through the mean:
      the summed gradient is the same).

    Args:
        logprobs: ``(N, T)`` (grad).
        old_logprobs: ``(N, T)`` (no grad).
        response_mask: ``(N, T)``; required for ``sequence``.
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"unknown importance_sampling_level {level!r}; valid: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    if response_mask is None:
        raise ValueError("importance_sampling_level='sequence' needs the response_mask")
    m = response_mask.to(log_ratio.dtype)
    seq = (log_ratio.detach() * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
    return seq + logprobs - logprobs.detach()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    *,
    response_mask: Optional[Tensor] = None,
    importance_sampling_level: ImportanceSamplingLevel = "token",
) -> PolicyLoss:
    """PPO clipped surrogate with asymmetric clip and optional dual clip, per token.

    ``ratio = exp(clamp(log r, -20, 20))`` with ``log r`` from :func:`importance_log_ratio`
    (``logp - old_logp`` per token, or GSPO's sequence ratio),
    ``L = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))``, and where ``A < 0`` with
    dual clip ``c > 1``: ``L = min(L, -c A)`` (Ye et al. 2020, arXiv 1912.09729).
    Clip-higher (``eps_high > eps_low``) is DAPO's (arXiv 2503.14476). GSPO clips the sequence
    ratio with much smaller ranges (the paper: ``eps_low = 3e-4``, ``eps_high = 4e-4``).

    Args:
        logprobs: ``(N, T)`` log-probs of the sampled tokens under the current policy (grad).
        old_logprobs: ``(N, T)`` under the policy that generated the batch (no grad).
        advantages: ``(N, T)``.
        response_mask: ``(N, T)``, needed by ``importance_sampling_level="sequence"``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = importance_log_ratio(logprobs, old_logprobs, response_mask, importance_sampling_level)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    with torch.no_grad():
        low = (advantages < 0) & (ratio < 1.0 - eps_low)
        high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return PolicyLoss(loss, ratio, low, high)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimatorName = "k3") -> Tensor:
    """Per-token KL term of the loss (placement ``loss``), with gradient through ``logprobs``.
    Multiply by beta and aggregate like the policy loss."""
    return kl_penalty(logprobs, ref_logprobs, estimator)


def truncated_loss_mask(response_mask: Tensor, truncated: Tensor) -> Tensor:
    """TRL's ``mask_truncated_completions``: the loss mask that leaves out every response cut
    at the length limit without EOS, ``m'[i,t] = m[i,t] (1 - truncated_i)``.
    ``(N, T)``, ``(N,)`` bool -> ``(N, T)``. Advantages are computed before this mask (the
    truncated responses still count in group and batch statistics, as in TRL)."""
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(f"truncated {tuple(truncated.shape)} does not match response_mask {tuple(response_mask.shape)}")
    return response_mask * (~truncated.bool()).to(response_mask.dtype)[:, None]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution ``H = logsumexp(z) - sum softmax(z) z``,
    ``(..., V)`` -> ``(...)``, computed in float32."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    # where p == 0 (a logit of -inf) the term p * z is 0, not nan
    return torch.logsumexp(z, dim=-1) - torch.where(p > 0, p * z, 0.0).sum(dim=-1)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip_eps: Optional[float] = 0.2) -> Tensor:
    """Clipped value loss (PPO, as in OpenAI baselines), per token:
    ``0.5 * max((V - R)^2, (old_V + clip(V - old_V, -eps, eps) - R)^2)``; unclipped if
    ``clip_eps`` is ``None``. All arguments ``(N, T)``."""
    unclipped = (values - returns).square()
    if clip_eps is None:
        return 0.5 * unclipped
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.maximum(unclipped, (v_clipped - returns).square())


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: LossAgg = "token-mean",
    *,
    num_tokens: Optional[float] = None,
    num_sequences: Optional[float] = None,
    max_response_length: Optional[int] = None,
) -> Tensor:
    """Reduce a per-token loss ``(N, T)`` to a scalar.

    * ``token-mean``: ``sum_{i,t} m L / num_tokens`` (every real token of the window weighs the same)
    * ``seq-mean-token-mean``: ``sum_i (sum_t m L / sum_t m) / num_sequences``
    * ``seq-mean-token-sum``: ``sum_i sum_t m L / num_sequences``
    * ``seq-mean-token-sum-norm``: ``sum_i sum_t m L / (num_sequences * max_response_length)``
      (Dr. GRPO: a constant normaliser, no length bias)

    ``num_tokens`` and ``num_sequences`` are the counts of the whole optimizer-step window
    (every micro-batch on every rank); left ``None`` they are this batch's own, which is right
    when the batch *is* the window. Passing the window counts makes the micro-batch losses sum
    to the window loss exactly. (Under DDP, whose gradients are averaged over ranks, multiply
    the result by the world size.)
    """
    if mode not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(LOSS_AGGS)}")
    m = mask.to(loss.dtype)
    if mode == "token-mean":
        n = m.sum() if num_tokens is None else num_tokens
        if float(n) <= 0:
            raise ValueError("token-mean aggregation over zero tokens (all-zero mask)")
        return (loss * m).sum() / n
    seqs = loss.shape[0] if num_sequences is None else num_sequences
    per_seq_sum = (loss * m).sum(dim=-1)
    if mode == "seq-mean-token-mean":
        lengths = m.sum(dim=-1)
        if bool((lengths <= 0).any()):
            raise ValueError("seq-mean-token-mean: a sequence has an all-zero mask")
        return (per_seq_sum / lengths).sum() / seqs
    if mode == "seq-mean-token-sum":
        return per_seq_sum.sum() / seqs
    length = loss.shape[-1] if max_response_length is None else max_response_length
    return per_seq_sum.sum() / (seqs * length)
