"""Reward shaping, applied to the scalar rewards before any advantage estimator.

Order (docs/algorithms.md, "The pipeline, in order"): length penalties, group baseline (if the
estimator has one), clip to ``[-c, c]``, then token rewards: ``-beta * kl`` on every real token (KL placement
``reward`` only) plus the scalar reward on the last real token.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def last_token_index(response_mask: Tensor) -> Tensor:
    """Index of the last real token of each response (the EOS if one was generated, otherwise
    the last generated token), ``(N, T)`` -> ``(N,)`` long.

    Raises ``ValueError`` if a response has no real token: a reward would have nowhere to go.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (N, T), got {tuple(response_mask.shape)}")
    lengths = response_mask.sum(dim=1)
    if bool((lengths <= 0).any()):
        bad = torch.nonzero(lengths <= 0).flatten().tolist()
        raise ValueError(f"responses {bad} have an all-zero response_mask: no token to carry the reward")
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    # Last position where the mask is set; works for masks with holes as well as right padding.
    return torch.where(response_mask.bool(), positions, -1).amax(dim=1)


def group_view(rewards: Tensor, samples_per_prompt: int) -> Tensor:
    """``(N,)`` -> ``(P, k)``: responses are laid out prompt by prompt, ``k`` samples each."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got {tuple(rewards.shape)}")
    if samples_per_prompt < 1 or rewards.numel() % samples_per_prompt:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of samples_per_prompt={samples_per_prompt}"
        )
    return rewards.view(-1, samples_per_prompt)


def require_groups(name: str, samples_per_prompt: int) -> None:
    """Refuse ``samples_per_prompt == 1`` for an estimator that compares samples of one prompt."""
    if samples_per_prompt < 2:
        raise ValueError(
            f"estimator {name!r} needs samples_per_prompt >= 2 (it compares samples of the same prompt); "
            f"got {samples_per_prompt}. Use 'reinforce_pp' for one sample per prompt."
        )


def group_mean_baseline(rewards: Tensor, samples_per_prompt: int) -> Tensor:
    """``R_i - mean_{j in group(i)} R_j``, ``(N,)`` -> ``(N,)`` (REINFORCE++-baseline, Dr. GRPO)."""
    g = group_view(rewards, samples_per_prompt)
    return (g - g.mean(dim=1, keepdim=True)).flatten()


def group_normalize(rewards: Tensor, samples_per_prompt: int, eps: float = 1e-6) -> Tensor:
    """GRPO: ``(R_i - mean_g) / (std_g + eps)`` with the sample (unbiased, ddof=1) std of the
    group, as in the GRPO paper's implementations. ``(N,)`` -> ``(N,)``. A group whose rewards
    are all equal gets advantage 0."""
    g = group_view(rewards, samples_per_prompt)
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)).flatten()


def leave_one_out_baseline(rewards: Tensor, samples_per_prompt: int) -> Tensor:
    """RLOO: ``R_i - mean_{j != i} R_j = k / (k - 1) * (R_i - mean_g)``, ``(N,)`` -> ``(N,)``."""
    g = group_view(rewards, samples_per_prompt)
    k = samples_per_prompt
    return ((g - (g.sum(dim=1, keepdim=True) - g) / (k - 1))).flatten()


def clip_rewards(rewards: Tensor, clip: float) -> Tensor:
    """Clip scalar rewards to ``[-clip, clip]``."""
    if clip <= 0:
        raise ValueError(f"reward clip must be > 0, got {clip}")
    return rewards.clamp(-clip, clip)


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), ``(N,)`` -> ``(N,)``:

    ``0`` if ``L <= L_max - L_buf``; ``((L_max - L_buf) - L) / L_buf * factor`` if
    ``L_max - L_buf < L <= L_max``; ``-factor`` beyond ``L_max``.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    lengths = lengths.float()
    start = max_length - buffer
    ramp = (start - lengths) / buffer * factor
    beyond = -factor * torch.ones_like(lengths)
    return torch.where(lengths <= start, torch.zeros_like(lengths), torch.where(lengths <= max_length, ramp, beyond))


def truncation_penalty(truncated: Tensor, penalty: float) -> Tensor:
    """``-penalty`` for responses that hit the length limit without EOS, else 0. ``(N,)`` bool -> float."""
    return -penalty * truncated.float()


def token_rewards(
    rewards: Tensor,
    response_mask: Tensor,
    kl: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    step_rewards: Optional[Tensor] = None,
) -> Tensor:
    """Token-level rewards ``r[i,t] = -beta * kl[i,t] * mask[i,t] + R_i * [t == last_i] (+ step_rewards)``.

    Args:
        rewards: ``(N,)`` scalar reward per response (already shaped and clipped).
        response_mask: ``(N, T)``.
        kl: ``(N, T)`` per-token KL (``old_logprobs`` vs ``ref_logprobs``), only when the KL
            placement is ``reward``; ``None`` otherwise.
        kl_coef: beta.
        step_rewards: ``(N, T)`` rewards that arrive per step (Gymnasium), or ``None``.
    Returns:
        ``(N, T)`` float32, zero on padding.
    """
    mask = response_mask.float()
    r = torch.zeros_like(mask)
    if kl is not None:
        r = r - kl_coef * kl.float() * mask
    if step_rewards is not None:
        r = r + step_rewards.float() * mask
    last = last_token_index(response_mask)
    return r.index_put((torch.arange(r.shape[0], device=r.device), last), rewards.float(), accumulate=True)


def distillation_token_rewards(logprobs: Tensor, teacher_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """On-policy distillation rewards: per token, the negative single-sample estimate of the
    reverse KL from the student to the teacher on the student's own sample,
    ``r[i,t] = -(logp_student[i,t] - logp_teacher[i,t]) * mask[i,t]``.

    Its expectation under the student is ``-KL(pi_student || pi_teacher)`` at that prefix, so
    maximising it is on-policy distillation with the reverse KL (Agarwal et al. 2024, "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes", GKD, arXiv 2306.13649,
    with the reverse-KL divergence; Thinking Machines, "On-Policy Distillation", 2025, which uses
    it as the per-token advantage with discount 0). Pass it as the ``step_rewards`` of
    :func:`token_rewards`: with ``gamma = 0`` each token is scored by its own term (Thinking
    Machines' form), with ``gamma = 1`` by the remaining sequence's KL (a Monte Carlo return of
    the sequence-level reverse KL). No gradient: a reward, computed in float32.

    Args:
        logprobs: ``(N, T)`` log-probs of the sampled tokens under the student (the policy).
        teacher_logprobs: ``(N, T)`` the same tokens under the teacher.
        response_mask: ``(N, T)``.
    Returns:
        ``(N, T)`` float32, 0 on padding.
    """
    if logprobs.shape != teacher_logprobs.shape or logprobs.shape != response_mask.shape:
        shapes = [tuple(t.shape) for t in (logprobs, teacher_logprobs, response_mask)]
        raise ValueError(f"shapes differ: logprobs, teacher_logprobs, response_mask are {shapes}")
    diff = logprobs.detach().float() - teacher_logprobs.detach().float()
    return torch.where(response_mask.bool(), -diff, torch.zeros_like(diff))
