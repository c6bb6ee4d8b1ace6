"""The rest of the per-token objective and its reduction (docs/algorithms.md, "The policy loss
(shared by every estimator)" and "Loss aggregation, micro-batches and ranks"): the KL, entropy and
value terms beside the policy loss (:mod:`.losses`), their sum :func:`token_loss`, and
:func:`aggregate`.

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
from .losses import PolicyLoss, PolicyLossName, PolicyLossParams, compute_policy_loss

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGGS: tuple[str, ...] = get_args(LossAgg)

_DEFAULT_PARAMS = PolicyLossParams()


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
        raise ValueError(
            f"truncated {tuple(truncated.shape)} does not match response_mask {tuple(response_mask.shape)}"
        )
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


class TokenLoss(NamedTuple):
    """The per-token loss of one micro-batch and its parts. All ``(N, T)``."""

    loss: Tensor
    """the total, to be aggregated"""
    policy: PolicyLoss
    kl: Optional[Tensor]
    """``kl(logp, ref_logp)`` before beta, with gradient (placement ``loss``); None otherwise"""


def token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    policy: PolicyLossName = "ppo",
    params: PolicyLossParams = _DEFAULT_PARAMS,
    generator: Optional[torch.Generator] = None,
    is_weights: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimatorName = "k3",
    entropy: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
) -> TokenLoss:
    """The per-token loss every estimator shares (docs/algorithms.md, "The policy loss"):

    ``L[i,t] = w[i,t] L_pol[i,t] + beta kl(logp, ref_logp)[i,t] - c_H H[i,t]``

    with ``L_pol`` the policy loss ``policy`` (:func:`compute_policy_loss`: PPO's clipped
    surrogate by default), ``w`` the importance weights that correct for the sampler
    (``is_weights``, no gradient; 1 when None), the KL term only when ``ref_logprobs`` is given
    (KL placement ``loss``; placement ``reward`` put it in the token rewards instead) and the
    entropy bonus only when ``entropy_coef`` is not 0. Aggregate the result with :func:`aggregate`.

    Args:
        logprobs: ``(N, T)`` (grad); old_logprobs, advantages, response_mask: ``(N, T)``.
        is_weights: ``(N, T)`` or None.
        ref_logprobs: ``(N, T)`` reference log-probs, or None (no KL term in the loss).
        entropy: ``(N, T)``, needed when ``entropy_coef`` is not 0.
    """
    pl = compute_policy_loss(policy, logprobs, old_logprobs, advantages, response_mask, params, generator)
    loss = pl.loss if is_weights is None else pl.loss * is_weights
    kl = None
    if ref_logprobs is not None:
        kl = kl_loss(logprobs, ref_logprobs, kl_estimator)
        loss = loss + kl_coef * kl
    if entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef is not 0 but no entropy was given")
        loss = loss - entropy_coef * entropy
    return TokenLoss(loss, pl, kl)
