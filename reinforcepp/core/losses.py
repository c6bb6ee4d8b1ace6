"""The per-token policy losses (docs/algorithms.md, "The policy loss (shared by every
estimator)" and "Loss variants"): PPO's clipped ratio (dual clip, GSPO's sequence ratio), CISPO,
Clip-Cov and KL-Cov, one signature for all in :func:`compute_policy_loss`.

Each returns a per-token ``(N, T)`` tensor; the terms beside it (KL, entropy, value), their sum
:func:`~reinforcepp.core.objective.token_loss` and the aggregation to a scalar are in
:mod:`.objective`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, get_args

import torch
from torch import Tensor

ImportanceSamplingLevel = Literal["token", "sequence"]
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")



class PolicyLoss(NamedTuple):
    """Per-token clipped surrogate and what the metrics need. All ``(N, T)``."""

    loss: Tensor
    ratio: Tensor
    clipped_low: Tensor
    """bool: the lower clip binds (``A < 0`` and ``ratio < 1 - eps_low``)."""
    clipped_high: Tensor
    """bool: the upper clip binds (``A > 0`` and ``ratio > 1 + eps_high``)."""
    selected: Optional[Tensor] = None
    """bool: the tokens a covariance-based loss acted on (Clip-Cov, KL-Cov); None for the others."""


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


# --- loss variants: CISPO, Clip-Cov, KL-Cov (docs/algorithms.md, "Loss variants") -------------------------------


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_low: Optional[float] = None,
    eps_high: float = 4.0,
) -> PolicyLoss:
    """CISPO (MiniMax-M1, arXiv 2506.13585): the REINFORCE term weighted by a clipped,
    stop-gradient importance weight, per token

    ``L = -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi_theta``, ``r = exp(clamp(logp - old_logp, -20, 20))``

    so every token keeps a gradient, ``-w A grad log pi``, with ``w`` bounded; PPO's clip instead
    drops the gradient of a token whose ratio left the range. Defaults: no lower bound
    (``eps_low=None``: ``w`` in ``[0, 1 + eps_high]``; MiniMax-M1 "did not impose a lower bound
    ... and only tuned eps_high", without publishing the value) and ``eps_high = 4``, the upper
    bound 5 of ScaleRL (Khatri et al. 2025, arXiv 2510.13786, ``clip(r, 0, eps_max)``, insensitive
    to eps_max in {4, 5, 8}) and of SkyRL's defaults. The loss *value* is ``-w A logp``, not near 0;
    only its gradient is meaningful. Aggregate like :func:`policy_loss` (the paper: token-mean).

    Args:
        logprobs: ``(N, T)`` (grad). old_logprobs: ``(N, T)`` (no grad). advantages: ``(N, T)``.
    Returns:
        :class:`PolicyLoss`; here ``clipped_low`` / ``clipped_high`` mark the tokens whose *weight*
        was clipped (``r < 1 - eps_low`` / ``r > 1 + eps_high``, whatever the sign of ``A``).
    """
    if eps_high <= 0 or (eps_low is not None and eps_low <= 0):
        raise ValueError(f"CISPO needs eps_high > 0 and eps_low > 0 or None, got {eps_low}, {eps_high}")
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    low = 0.0 if eps_low is None else 1.0 - eps_low
    weight = ratio.detach().clamp(low, 1.0 + eps_high)
    loss = -weight * advantages * logprobs
    with torch.no_grad():
        clipped_low = ratio < low
        clipped_high = ratio > 1.0 + eps_high
    return PolicyLoss(loss, ratio, clipped_low, clipped_high)


class CovPolicyLoss(NamedTuple):
    """Per-token loss of Clip-Cov / KL-Cov and what the metrics need. All ``(N, T)``."""

    loss: Tensor
    ratio: Tensor
    clipped_low: Tensor
    """bool: PPO's lower clip binds (Clip-Cov; always ``False`` for KL-Cov, which has no clip)."""
    clipped_high: Tensor
    """bool: PPO's upper clip binds (likewise)."""
    covariance: Tensor
    """``Cov_t`` of :func:`token_covariance` (0 on padding)."""
    selected: Tensor
    """bool: the tokens the method acted on (gradient detached, or KL-penalised)."""


def token_covariance(logprobs: Tensor, advantages: Tensor, response_mask: Tensor) -> Tensor:
    """The per-token centred covariance of Cui et al. 2025 (arXiv 2505.22617),
    ``Cov_t = (logp_t - mean(logp)) (A_t - mean(A))`` with both means over the real tokens of the
    batch passed (``logp`` detached), 0 on padding. ``(N, T)`` x3 -> ``(N, T)``.

    A positive ``Cov_t`` (a likely token with a high advantage, or an unlikely one with a low
    advantage) is what lowers the policy's entropy under a policy-gradient step (the paper's
    analysis of entropy dynamics). The statistics are those of the tensors passed (verl: each micro-batch)."""
    m = response_mask.to(logprobs.dtype)
    n = m.sum().clamp_min(1.0)
    logp = logprobs.detach()
    logp_c = logp - (logp * m).sum() / n
    adv_c = advantages - (advantages * m).sum() / n
    return logp_c * adv_c * m


def clip_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_ratio: float = 2e-4,
    cov_lb: float = 1.0,
    cov_ub: float = 5.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    generator: Optional[torch.Generator] = None,
) -> CovPolicyLoss:
    """Clip-Cov (Cui et al. 2025, arXiv 2505.22617; verl policy loss ``clip_cov``).

    Start from the PPO loss of :func:`policy_loss`. Among the real tokens whose PPO clip does not
    already bind and whose covariance (:func:`token_covariance`) lies strictly inside
    ``(cov_lb, cov_ub)``, draw ``n = max(int(clip_ratio * T_real), 1)`` at random (all of them if
    fewer qualify) and zero their loss, which detaches their gradient:
    ``L_t = 0`` for a drawn token, the PPO loss otherwise. Defaults are the paper's and verl's:
    ``clip_ratio = 2e-4``, ``cov_lb = 1``, ``cov_ub = 5``; verl's ``recipe/entropy`` 7B script
    also widens PPO's clip (``clip_ratio_low = clip_ratio_high = 1``).

    The draw takes ``generator`` (a ``torch.Generator``; ``None`` uses torch's global generator):
    the eligible tokens in row-major order are permuted by ``torch.randperm(k, generator=...)``
    and the first ``n`` are taken, so a seeded generator gives an exact, repeatable selection.

    Args:
        logprobs: ``(N, T)`` (grad). old_logprobs: ``(N, T)``. advantages: ``(N, T)``.
        response_mask: ``(N, T)``.
    """
    if clip_ratio <= 0 or cov_lb >= cov_ub:
        raise ValueError(f"Clip-Cov needs clip_ratio > 0 and cov_lb < cov_ub, got {clip_ratio}, {cov_lb}, {cov_ub}")
    pl = policy_loss(logprobs, old_logprobs, advantages, eps_low, eps_high)
    real = response_mask.bool()
    cov = token_covariance(logprobs, advantages, response_mask)
    eligible = real & ~(pl.clipped_low | pl.clipped_high) & (cov > cov_lb) & (cov < cov_ub)
    candidates = torch.nonzero(eligible.flatten()).flatten()
    n = max(int(clip_ratio * int(real.sum())), 1)
    device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(candidates.numel(), generator=generator, device=device)
    chosen = candidates[perm.to(candidates.device)[:n]]
    selected = torch.zeros(eligible.numel(), dtype=torch.bool, device=eligible.device)
    selected[chosen] = True
    selected = selected.view_as(eligible)
    loss = torch.where(selected, torch.zeros_like(pl.loss), pl.loss)
    return CovPolicyLoss(loss, pl.ratio, pl.clipped_low, pl.clipped_high, cov, selected)


def kl_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    kl_ratio: float = 2e-4,
    kl_coef: float = 1.0,
) -> CovPolicyLoss:
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617; verl policy loss ``kl_cov``), per token:

    ``L_t = -r_t A_t + kl_coef |logp_t - old_logp_t|`` for the ``max(int(kl_ratio * T_real), 1)``
    real tokens with the largest covariance (:func:`token_covariance`), ``L_t = -r_t A_t`` for the
    others, with ``r = exp(clamp(logp - old_logp, -20, 20))`` and **no** PPO clip (the penalty on
    the high-covariance tokens takes its place). Defaults: verl's ``kl_cov_ratio = 2e-4`` and
    ``ppo_kl_coef = 1``; verl's ``recipe/entropy`` 7B script uses ``kl_ratio = 2e-3``. The selection is
    deterministic (``torch.topk``).

    Args:
        logprobs: ``(N, T)`` (grad). old_logprobs: ``(N, T)``. advantages: ``(N, T)``.
        response_mask: ``(N, T)``.
    """
    if kl_ratio <= 0 or kl_coef < 0:
        raise ValueError(f"KL-Cov needs kl_ratio > 0 and kl_coef >= 0, got {kl_ratio}, {kl_coef}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    real = response_mask.bool()
    cov = token_covariance(logprobs, advantages, response_mask)
    positions = torch.nonzero(real.flatten()).flatten()
    selected = torch.zeros(real.numel(), dtype=torch.bool, device=real.device)
    if positions.numel():
        n = min(max(int(kl_ratio * positions.numel()), 1), positions.numel())
        selected[positions[torch.topk(cov.flatten()[positions], n).indices]] = True
    selected = selected.view_as(real)
    loss = -advantages * ratio + torch.where(selected, kl_coef * log_ratio.abs(), torch.zeros_like(ratio))
    no_clip = torch.zeros_like(real)
    return CovPolicyLoss(loss, ratio, no_clip, no_clip, cov, selected)


PolicyLossName = Literal["ppo", "cispo", "clip_cov", "kl_cov"]
POLICY_LOSSES: tuple[str, ...] = get_args(PolicyLossName)


@dataclass(frozen=True)
class PolicyLossParams:
    """The settings of every policy loss (docs/algorithms.md, "The policy loss" and "Loss variants");
    each loss reads its own."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    importance_sampling_level: ImportanceSamplingLevel = "token"
    cispo_eps_low: Optional[float] = None
    cispo_eps_high: float = 4.0
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    kl_cov_coef: float = 1.0


def compute_policy_loss(
    name: PolicyLossName,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    params: PolicyLossParams = PolicyLossParams(),
    generator: Optional[torch.Generator] = None,
) -> PolicyLoss:
    """The per-token policy loss ``name``, one signature for all: ``ppo`` (:func:`policy_loss`,
    clipped ratio, dual clip, GSPO's sequence ratio), ``cispo`` (:func:`cispo_loss`), ``clip_cov``
    (:func:`clip_cov_loss`, drawing with ``generator``) and ``kl_cov`` (:func:`kl_cov_loss`). All
    ``(N, T)``; ``selected`` marks the tokens Clip-Cov / KL-Cov acted on."""
    p = params
    if name == "ppo":
        return policy_loss(logprobs, old_logprobs, advantages, p.eps_low, p.eps_high, p.dual_clip,
                           response_mask=response_mask, importance_sampling_level=p.importance_sampling_level)
    if name == "cispo":
        return cispo_loss(logprobs, old_logprobs, advantages, p.cispo_eps_low, p.cispo_eps_high)
    if name == "clip_cov":
        cov: CovPolicyLoss = clip_cov_loss(logprobs, old_logprobs, advantages, response_mask,
                                           clip_ratio=p.clip_cov_ratio, cov_lb=p.clip_cov_lb, cov_ub=p.clip_cov_ub,
                                           eps_low=p.eps_low, eps_high=p.eps_high, generator=generator)
    elif name == "kl_cov":
        cov = kl_cov_loss(logprobs, old_logprobs, advantages, response_mask, kl_ratio=p.kl_cov_ratio,
                          kl_coef=p.kl_cov_coef)
    else:
        raise ValueError(f"unknown policy loss {name!r}; valid: {', '.join(POLICY_LOSSES)}")
    return PolicyLoss(cov.loss, cov.ratio, cov.clipped_low, cov.clipped_high, cov.selected)
