"""Off-policy correction for asynchronous rollouts: the decoupled PPO weight, and staleness.

With asynchronous rollouts the engine samples the responses of later steps while the trainer
updates on the current one, so a response may come from an older policy version (and, with
partial rollouts, its tokens from several versions). Three policies meet in the loss
(docs/algorithms.md, "Asynchronous rollouts: staleness and off-policy correction"):

* the behaviour policy ``mu`` that sampled each token (``behaviour_logprobs``, reported by the
  engine per token, whichever version sampled it);
* the proximal policy ``pi_prox`` (``old_logprobs``, recomputed by the trainer at the start of
  the update), the anchor of the PPO clip;
* the policy being trained ``pi_theta`` (``logprobs``).

The decoupled PPO objective (Hilton et al., "Batch size-invariance for policy optimization",
arXiv 2110.00641; AReaL, Fu et al. 2025, arXiv 2505.24298) clips ``r = pi_theta / pi_prox`` as
:func:`~reinforcepp.core.losses.policy_loss` does and multiplies each token's policy-gradient
loss by the gradient-free weight ``w = pi_prox / mu``, before aggregation:

    L[i,t] = w[i,t] * max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))

:func:`rollout_correction` computes ``w`` (truncated, masked or raw, per token, per response or
as a geometric mean), :func:`correction_stats` and :func:`staleness_stats` what is logged.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional, get_args

import torch
from torch import Tensor

from .stats import Reduce, _reduced

CorrectionMode = Literal["truncate", "mask", "none"]
CorrectionLevel = Literal["token", "sequence", "geometric"]
CORRECTION_MODES: tuple[str, ...] = get_args(CorrectionMode)
CORRECTION_LEVELS: tuple[str, ...] = get_args(CorrectionLevel)

LOG_WEIGHT_BOUND = 20.0
"""Mode ``none`` only: ``log w`` is capped at 20 (``w <= e^20 ~ 4.85e8``, verl's safety bound) so
that a raw weight cannot overflow. A weight that reaches it is useless anyway: truncate or mask."""


class RolloutCorrection(NamedTuple):
    """The behaviour-to-proximal weights of a batch. All ``(N, T)``; padding is 0 / False."""

    weights: Tensor
    """float, no gradient: ``w`` on real tokens (0 where masked), 0 on padding."""
    masked: Tensor
    """bool: real tokens whose weight is 0 because it left ``[low, high]`` (mode ``mask``)."""
    log_ratio: Tensor
    """float: ``log(pi_prox / mu)`` at the chosen level, before truncation or masking (the per-token
    difference, the response's sum or its mean, broadcast over its real tokens); 0 on padding."""
    truncated: Tensor
    """bool: real tokens whose weight was capped at ``high`` (mode ``truncate``)."""


def check_rollout_correction(
    mode: str, level: str, low: Optional[float] = None, high: Optional[float] = None
) -> None:
    """Validate a mode, a level and the bounds they take; ``ValueError`` naming the bad value.

    * ``truncate``: ``high`` finite and ``> 0``; ``low`` must be ``None`` (the weight is capped
      from above only, as verl's ``rollout_is``, slime's ``truncate`` and Yao et al.'s TIS do:
      raising a small weight adds bias and removes no variance, since ``w^2 <= w`` for
      ``w <= 1``; to drop tokens whose weight is too small, use ``mask``).
    * ``mask``: ``high`` finite; ``low`` ``None`` (no lower bound, i.e. 0) or in ``[0, high)``;
      ``low <= 1 <= high``, so that a token sampled by the proximal policy itself (``w = 1``)
      is always kept.
    * ``none``: no bounds at all.
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown rollout correction mode {mode!r}; valid: {', '.join(CORRECTION_MODES)}")
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"unknown rollout correction level {level!r}; valid: {', '.join(CORRECTION_LEVELS)}")
    if mode == "none":
        if low is not None or high is not None:
            raise ValueError(f"rollout correction mode 'none' takes no bounds, got low={low}, high={high}")
        return
    if high is None or not math.isfinite(high):
        raise ValueError(f"rollout correction mode {mode!r} needs a finite upper bound high, got {high}")
    if mode == "truncate":
        if low is not None:
            raise ValueError(
                f"rollout correction mode 'truncate' caps weights from above only and takes no low (got {low}); "
                "use mode 'mask' to reject small weights"
            )
        if not high > 0:
            raise ValueError(f"rollout correction: truncate needs high > 0, got {high}")
        return
    lo = 0.0 if low is None else low
    if not math.isfinite(lo) or lo < 0:
        raise ValueError(f"rollout correction: low must be finite and >= 0, got {low}")
    if not lo < high:
        raise ValueError(f"rollout correction: empty or reversed bounds [low={lo}, high={high}]")
    if not lo <= 1.0 <= high:
        raise ValueError(f"rollout correction: the bounds [low={lo}, high={high}] must contain 1 (an on-policy token)")


def rollout_correction(
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    response_mask: Tensor,
    mode: CorrectionMode = "truncate",
    level: CorrectionLevel = "token",
    low: Optional[float] = None,
    high: Optional[float] = None,
) -> RolloutCorrection:
    """The decoupled PPO weight ``w = pi_prox / mu`` per token, truncated, masked or raw.

    With ``d[i,t] = m[i,t] (old_logprobs - behaviour_logprobs)[i,t]`` (padding set to 0 before
    anything is added, so it may hold anything, even inf or nan), the log-weight ``l`` is

    * ``token``: ``l[i,t] = d[i,t]`` (per-token ratio; Yao et al. 2025 TIS, OpenRLHF ICEPOP);
    * ``sequence``: ``l[i,t] = sum_s d[i,s]`` (the product of the response's token ratios, the
      unbiased sequence weight), one value per response broadcast over its real tokens;
    * ``geometric``: ``l[i,t] = sum_s d[i,s] / T_i`` (the geometric mean of the token ratios,
      ``T_i`` the real tokens of response ``i``), broadcast likewise.

    and, always in log space (no overflow, whatever the log-ratio):

    * ``truncate``: ``w = exp(min(l, log high))`` (verl ``rollout_is`` "truncate", TIS);
    * ``mask``: ``w = exp(l)`` if ``log low <= l <= log high``, else 0 and the token is marked
      ``masked`` (verl "mask", slime MIS, OpenRLHF ICEPOP): at ``sequence`` and ``geometric``
      level the whole response is masked;
    * ``none``: ``w = exp(min(l, 20))``, the raw weight (the guard is :data:`LOG_WEIGHT_BOUND`).

    ``w`` carries no gradient and multiplies each real token's policy-gradient loss before
    aggregation; the KL and entropy terms are not weighted, and the aggregation's normalisers
    are left as they are (a masked token counts, with loss 0). When ``old_logprobs`` equals
    ``behaviour_logprobs`` every real token gets ``w = 1`` exactly and none is masked (with
    ``truncate``, when ``high >= 1``). A nan log-ratio on a real token is not hidden: its
    weight is nan with ``truncate`` and ``none`` (and at sequence level the response's), and it
    is masked with ``mask`` (nan lies in no interval).

    Args:
        old_logprobs: ``(N, T)`` log-probs of the sampled tokens under the proximal policy
            (recomputed by the trainer at the start of the update).
        behaviour_logprobs: ``(N, T)`` the log-probs each token was sampled with (the engine's,
            per token, under the policy version that sampled it).
        response_mask: ``(N, T)``, nonzero on real response tokens.
        mode, level, low, high: see :func:`check_rollout_correction`.

    Returns:
        :class:`RolloutCorrection`; floats in ``float32``, or ``float64`` for ``float64`` input.
    """
    check_rollout_correction(mode, level, low, high)
    if old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs must be (N, T), got shape {tuple(old_logprobs.shape)}")
    for name, x in (("behaviour_logprobs", behaviour_logprobs), ("response_mask", response_mask)):
        if x.shape != old_logprobs.shape:
            raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} and {name} {tuple(x.shape)} differ in shape")
    out_dtype = torch.promote_types(torch.promote_types(old_logprobs.dtype, behaviour_logprobs.dtype), torch.float32)
    real = response_mask != 0
    diff = torch.where(real, old_logprobs.detach().double() - behaviour_logprobs.detach().double(), 0.0)
    if level == "token":
        log_ratio = diff
    else:
        per_seq = diff.sum(-1, keepdim=True)
        if level == "geometric":
            per_seq = per_seq / real.sum(-1, keepdim=True).clamp_min(1)
        log_ratio = torch.where(real, per_seq.expand_as(diff), 0.0)
    nothing = torch.zeros_like(real)
    if mode == "none":
        weights, masked, truncated = torch.exp(log_ratio.clamp(max=LOG_WEIGHT_BOUND)), nothing, nothing
    elif mode == "truncate":
        assert high is not None  # checked above
        log_high = math.log(high)
        truncated = real & (log_ratio > log_high)
        weights, masked = torch.exp(log_ratio.clamp(max=log_high)), nothing
    else:
        assert high is not None  # checked above
        log_low = math.log(low) if low else -math.inf
        keep = (log_ratio >= log_low) & (log_ratio <= math.log(high))  # false for nan
        masked, truncated = real & ~keep, nothing
        weights = torch.where(keep, torch.exp(log_ratio.clamp(max=math.log(high))), 0.0)
    weights = torch.where(real & ~masked, weights, 0.0)
    return RolloutCorrection(weights.to(out_dtype), masked, log_ratio.to(out_dtype), truncated)


def correction_stats(
    result: RolloutCorrection, response_mask: Tensor, reduce: Optional[Reduce] = None
) -> dict[str, float]:
    """What the correction did, over the real tokens of the global batch.

    With ``w`` the weights as they multiply the loss (0 where masked) and ``n`` the real tokens:

    * ``rollout/is_weight_mean``: ``sum w / n``;
    * ``rollout/is_weight_max``, ``rollout/is_weight_min``: this process's extremes over its
      real tokens (0.0 when it has none); combine them over ranks with max and min;
    * ``rollout/is_ess``: the normalised effective sample size ``(sum w)^2 / (n sum w^2)``, in
      ``(0, 1]``, 1 when every weight is equal (on-policy), small when a few tokens carry the
      batch; 0 when every weight is 0;
    * ``rollout/masked_fraction``: masked real tokens / ``n``;
    * ``rollout/masked_sequence_fraction``: responses with a masked token / responses with a
      real token (at ``sequence`` and ``geometric`` level, the rejected responses);
    * ``rollout/truncated_fraction``: real tokens whose weight was capped / ``n``.

    Every value but the max and min is made of sums, exact over ranks with a ``reduce`` hook
    (every rank must call it). All are 0.0 when the global batch has no real token.
    """
    real = response_mask != 0
    if result.weights.shape != real.shape:
        raise ValueError(f"weights {tuple(result.weights.shape)} and response_mask {tuple(real.shape)} differ in shape")
    w = torch.where(real, result.weights.detach().double(), 0.0)
    has_tokens = real.any(-1)
    parts = [
        w.sum(),
        w.square().sum(),
        real.sum(),
        (result.masked & real).sum(),
        (result.truncated & real).sum(),
        has_tokens.sum(),
        ((result.masked & real).any(-1) & has_tokens).sum(),
    ]
    s, s2, n, n_masked, n_truncated, n_seq, n_seq_masked = _reduced(parts, reduce).tolist()
    local = w[real]
    return {
        "rollout/is_weight_mean": s / n if n > 0 else 0.0,
        "rollout/is_weight_max": float(local.max()) if local.numel() else 0.0,
        "rollout/is_weight_min": float(local.min()) if local.numel() else 0.0,
        "rollout/is_ess": s * s / (n * s2) if n > 0 and s2 > 0 else 0.0,
        "rollout/masked_fraction": n_masked / n if n > 0 else 0.0,
        "rollout/masked_sequence_fraction": n_seq_masked / n_seq if n_seq > 0 else 0.0,
        "rollout/truncated_fraction": n_truncated / n if n > 0 else 0.0,
    }


def staleness_stats(
    token_versions: Tensor, response_mask: Tensor, current_version: int, reduce: Optional[Reduce] = None
) -> dict[str, float]:
    """How many policy versions behind the trainer the batch was sampled.

    A token's staleness is ``current_version - token_versions[i,t]`` (the version that sampled
    it); a response's is ``current_version - min_t token_versions[i,t]`` over its real tokens
    (its oldest token: with partial rollouts one response may span versions).

    * ``staleness/token_mean``: mean over real tokens;
    * ``staleness/sequence_mean``: mean over responses with a real token;
    * ``staleness/sequence_max``: this process's largest (combine over ranks with max); it is
      also the largest token staleness, so that one is not logged twice;
    * ``staleness/mixed_sequence_fraction``: responses whose real tokens come from more than one
      version (partial rollouts) / responses with a real token.

    The means and the fraction are exact over ranks with a ``reduce`` hook; all are 0.0 when the
    global batch has no real token.

    Args:
        token_versions: ``(N, T)`` integer policy version of each token; padding may hold anything.
        response_mask: ``(N, T)``, nonzero on real tokens.
        current_version: the version being trained; a real token from a later version is an error.
    """
    if token_versions.dtype.is_floating_point or token_versions.dtype == torch.bool:
        raise ValueError(f"token_versions must be an integer tensor, got {token_versions.dtype}")
    if token_versions.shape != response_mask.shape or token_versions.dim() != 2:
        raise ValueError(
            f"token_versions {tuple(token_versions.shape)} and response_mask {tuple(response_mask.shape)} "
            "must be the same (N, T) shape"
        )
    real = response_mask != 0
    v = token_versions.long()
    if bool((real & (v > current_version)).any()):
        raise ValueError(f"token_versions has real tokens newer than current_version={current_version}")
    has_tokens = real.any(-1)
    big = torch.iinfo(torch.int64).max
    oldest = torch.where(real, v, big).min(-1).values
    newest = torch.where(real, v, -big).max(-1).values
    seq_staleness = torch.where(has_tokens, current_version - oldest, 0)
    parts = [
        torch.where(real, current_version - v, 0).sum(),
        real.sum(),
        seq_staleness.sum(),
        has_tokens.sum(),
        (has_tokens & (newest != oldest)).sum(),
    ]
    tok_sum, n_tok, seq_sum, n_seq, n_mixed = _reduced(parts, reduce).tolist()
    return {
        "staleness/token_mean": tok_sum / n_tok if n_tok > 0 else 0.0,
        "staleness/sequence_mean": seq_sum / n_seq if n_seq > 0 else 0.0,
        "staleness/sequence_max": float(seq_staleness[has_tokens].max()) if bool(has_tokens.any()) else 0.0,
        "staleness/mixed_sequence_fraction": n_mixed / n_seq if n_seq > 0 else 0.0,
    }
