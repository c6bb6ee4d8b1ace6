"""Advantage estimators: one registry, one signature.

Every estimator is a function ``(AdvantageInputs, AdvantageParams) -> Advantages``. They differ
only in how returns and advantages are computed from the same rollout; the policy loss,
clipping, entropy and KL machinery downstream are shared (docs/algorithms.md, "The estimators").

Register your own with :func:`register_estimator`::

    @register_estimator("my_estimator", needs_groups=False)
    def my_estimator(inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .returns import discounted_returns, gae as gae_returns
from .shaping import (
    clip_rewards,
    group_mean_baseline,
    group_normalize,
    leave_one_out_baseline,
    require_groups,
    token_rewards,
)
from .stats import Reduce, masked_whiten


@dataclass(frozen=True)
class AdvantageInputs:
    """One rollout batch, as every estimator sees it.

    Attributes:
        rewards: ``(N,)`` scalar reward per response ``R_i`` (weighted sum of reward sources,
            length penalties included). Zeros when all reward arrives per step.
        response_mask: ``(N, T)`` 1 on real response tokens / time steps (a prefix per row).
        samples_per_prompt: ``k``; responses are laid out prompt by prompt, ``k`` each.
        kl: ``(N, T)`` per-token KL of ``old_logprobs`` to ``ref_logprobs`` when the KL
            placement is ``reward``; ``None`` otherwise.
        values: ``(N, T)`` critic values ``V(s_t)`` (``gae`` only).
        step_rewards: ``(N, T)`` per-step rewards (Gymnasium), or ``None``.
        last_values: ``(N,)`` value of the state after the last step, for sequences cut by a
            time limit and bootstrapped (``gae``); ``None`` = every sequence ended terminally.
    """

    rewards: Tensor
    response_mask: Tensor
    samples_per_prompt: int = 1
    kl: Optional[Tensor] = None
    values: Optional[Tensor] = None
    step_rewards: Optional[Tensor] = None
    last_values: Optional[Tensor] = None


@dataclass(frozen=True)
class AdvantageParams:
    """Plain scalars shared by all estimators (each reads what it needs).

    Attributes:
        gamma: discount factor for returns (1.0 for language models, 0.99 for control).
        lam: GAE lambda (``gae`` only).
        kl_coef: beta, the KL coefficient in the token rewards (placement ``reward``).
        reward_clip: scalar rewards are clipped to ``[-reward_clip, reward_clip]``.
        whiten: global whitening of advantages for ``rloo`` (the others have a fixed rule).
        group_std_eps: epsilon added to the group std by ``grpo``.
        scale_rewards: ``grpo``'s division of ``R_i - mean_g`` (TRL's choices): by the group's
            std (``group``, the GRPO paper), by the std of every reward of the batch
            (``batch``, "Tricks or Traps" arXiv 2508.08221), or by nothing (``none``, Dr. GRPO's
            advantage).
        whiten_eps: floor of the variance in whitening.
        reduce: the reduction hook that makes statistics global (all-reduce of sums), or
            ``None`` on one process.
    """

    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.0
    reward_clip: float = 10.0
    whiten: bool = False
    group_std_eps: float = 1e-6
    scale_rewards: str = "group"
    whiten_eps: float = 1e-8
    reduce: Optional[Reduce] = None


@dataclass(frozen=True)
class Advantages:
    """Estimator output. ``advantages`` and ``returns`` are ``(N, T)``, zero on padding;
    ``returns`` are the value targets for ``gae`` and the (unwhitened) returns otherwise."""

    advantages: Tensor
    returns: Tensor


Estimator = Callable[[AdvantageInputs, AdvantageParams], Advantages]


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered estimator and what it requires.

    Attributes:
        fn: the estimator.
        needs_groups: refuses ``samples_per_prompt == 1``.
        needs_critic: needs ``values`` (a critic model is trained).
        kl_in_reward: accepts the KL placement ``reward`` (estimators that broadcast one
            scalar per response cannot carry per-token KL rewards).
        default_loss_agg: the loss aggregation its paper uses.
        default_kl_placement: where its paper puts the KL (``reward`` or ``loss``).
    """

    fn: Estimator
    needs_groups: bool = False
    needs_critic: bool = False
    kl_in_reward: bool = True
    default_loss_agg: str = "token-mean"
    default_kl_placement: str = "reward"


ESTIMATORS: dict[str, EstimatorSpec] = {}


def register_estimator(
    name: str,
    *,
    needs_groups: bool = False,
    needs_critic: bool = False,
    kl_in_reward: bool = True,
    default_loss_agg: str = "token-mean",
    default_kl_placement: Optional[str] = None,
    overwrite: bool = False,
) -> Callable[[Estimator], Estimator]:
    """Decorator registering an advantage estimator under ``name``. ``default_kl_placement``
    defaults to ``reward`` when the estimator takes KL in the reward, else ``loss``."""

    placement = default_kl_placement or ("reward" if kl_in_reward else "loss")
    if placement == "reward" and not kl_in_reward:
        raise ValueError(f"estimator {name!r}: default_kl_placement 'reward' but kl_in_reward=False")

    def wrap(fn: Estimator) -> Estimator:
        if name in ESTIMATORS and not overwrite:
            raise ValueError(f"advantage estimator {name!r} is already registered (pass overwrite=True)")
        ESTIMATORS[name] = EstimatorSpec(fn, needs_groups, needs_critic, kl_in_reward, default_loss_agg, placement)
        return fn

    return wrap


def get_estimator(name: str) -> EstimatorSpec:
    """The registered estimator ``name``; an unknown name raises listing the valid ones."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]


def compute_advantages(name: str, inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
    """Look up ``name``, check its requirements against ``inputs``, run it."""
    spec = get_estimator(name)
    if spec.needs_groups:
        require_groups(name, inputs.samples_per_prompt)
    if spec.needs_critic and inputs.values is None:
        raise ValueError(f"estimator {name!r} needs critic values (inputs.values is None)")
    if inputs.kl is not None and not spec.kl_in_reward:
        raise ValueError(f"estimator {name!r} does not take KL in the reward; use kl_placement 'loss' or 'none'")
    if inputs.response_mask.sum() <= 0:
        raise ValueError("the response_mask of the batch is all zero: no token to train on")
    return spec.fn(inputs, params)


def _token_rewards(inputs: AdvantageInputs, params: AdvantageParams, rewards: Tensor) -> Tensor:
    return token_rewards(rewards, inputs.response_mask, inputs.kl, params.kl_coef, inputs.step_rewards)


def _broadcast(per_response: Tensor, response_mask: Tensor) -> Tensor:
    return per_response.float()[:, None] * response_mask.float()


@register_estimator("reinforce_pp")
def reinforce_pp(inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
    """REINFORCE++ (arXiv 2501.03262): ``G[i,t] = sum_{s>=t} gamma^(s-t) r[i,s]`` with token
    rewards ``r`` (outcome reward on the last token, ``-beta kl`` on every token), then global
    token-weighted whitening ``A = (G - mu) / sqrt(max(var, eps))``."""
    r = _token_rewards(inputs, params, clip_rewards(inputs.rewards, params.reward_clip))
    g = discounted_returns(r, inputs.response_mask, params.gamma, inputs.last_values)
    a = masked_whiten(g, inputs.response_mask.float(), params.reduce, eps=params.whiten_eps)
    return Advantages(a, g)


@register_estimator("reinforce_pp_baseline", needs_groups=True, default_kl_placement="loss")
def reinforce_pp_baseline(inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
    """REINFORCE++-baseline: ``R_i <- R_i - mean_{group(i)} R`` (no std division), clip, token
    rewards, undiscounted returns (gamma must be 1), global token-weighted whitening."""
    if params.gamma != 1.0:
        raise ValueError("reinforce_pp_baseline uses gamma = 1 (the group baseline is a scalar per response); "
                         f"got gamma={params.gamma}")
    centred = clip_rewards(group_mean_baseline(inputs.rewards.float(), inputs.samples_per_prompt), params.reward_clip)
    r = _token_rewards(inputs, params, centred)
    g = discounted_returns(r, inputs.response_mask, 1.0, inputs.last_values)
    a = masked_whiten(g, inputs.response_mask.float(), params.reduce, eps=params.whiten_eps)
    return Advantages(a, g)


SCALE_REWARDS = ("group", "batch", "none")


def scaled_group_advantages(
    rewards: Tensor, samples_per_prompt: int, scale: str = "group", eps: float = 1e-6, reduce: Optional[Reduce] = None
) -> Tensor:
    """``(R_i - mean_g) / s``, ``(N,)`` -> ``(N,)``, with TRL's ``scale_rewards`` choices:

    * ``group``: ``s = std_g + eps`` (sample std of the group, :func:`group_normalize`);
    * ``batch``: ``s = std_B + eps``, the sample std of every reward of the global batch
      (all ranks, through ``reduce``);
    * ``none``: ``s = 1`` (Dr. GRPO).
    """
    if scale == "group":
        return group_normalize(rewards, samples_per_prompt, eps)
    centred = group_mean_baseline(rewards, samples_per_prompt)
    if scale == "none":
        return centred
    if scale != "batch":
        raise ValueError(f"unknown scale_rewards {scale!r}; valid: {', '.join(SCALE_REWARDS)}")
    r = rewards.double()
    n, s, s2 = float(r.numel()), float(r.sum()), float(r.square().sum())
    if reduce is not None:
        n, s, s2 = (float(x) for x in reduce(torch.tensor([n, s, s2], dtype=torch.float64)))
    var = max(0.0, (s2 - s * s / n) / max(n - 1.0, 1.0))
    return centred / (var**0.5 + eps)


@register_estimator("grpo", needs_groups=True, kl_in_reward=False)
def grpo(inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
    """GRPO (arXiv 2402.03300): ``A_i = (R_i - mean_g) / (std_g + eps)`` broadcast over the
    response's tokens; no global whitening. ``params.scale_rewards`` picks the divisor
    (:func:`scaled_group_advantages`)."""
    r = inputs.rewards.float()
    # Shaping order (docs/algorithms.md, "The pipeline, in order"): group baseline first, then the clip to [-c, c].
    scaled = scaled_group_advantages(r, inputs.samples_per_prompt, params.scale_rewards, params.group_std_eps,
                                     params.reduce)
    a = clip_rewards(scaled, params.reward_clip)
    returns = _broadcast(clip_rewards(r, params.reward_clip), inputs.response_mask)
    return Advantages(_broadcast(a, inputs.response_mask), returns)


@register_estimator("dr_grpo", needs_groups=True, kl_in_reward=False, default_loss_agg="seq-mean-token-sum-norm")
def dr_grpo(inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
    """Dr. GRPO (arXiv 2503.20783): ``A_i = R_i - mean_g`` broadcast (no std, no length
    normalisation; pair it with the ``seq-mean-token-sum-norm`` loss aggregation)."""
    r = inputs.rewards.float()
    a = clip_rewards(group_mean_baseline(r, inputs.samples_per_prompt), params.reward_clip)  # baseline, then clip
    returns = _broadcast(clip_rewards(r, params.reward_clip), inputs.response_mask)
    return Advantages(_broadcast(a, inputs.response_mask), returns)


@register_estimator("rloo", needs_groups=True, kl_in_reward=False)
def rloo(inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
    """RLOO (arXiv 2402.14740): ``A_i = R_i - mean_{j != i in group} R_j`` broadcast;
    optional global token-weighted whitening (``params.whiten``)."""
    r = inputs.rewards.float()
    # baseline, then clip
    baselined = clip_rewards(leave_one_out_baseline(r, inputs.samples_per_prompt), params.reward_clip)
    a = _broadcast(baselined, inputs.response_mask)
    if params.whiten:
        a = masked_whiten(a, inputs.response_mask.float(), params.reduce, eps=params.whiten_eps)
    return Advantages(a, _broadcast(clip_rewards(r, params.reward_clip), inputs.response_mask))


@register_estimator("gae", needs_critic=True)
def gae(inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
    """PPO with a critic: GAE(gamma, lambda) over token rewards, value targets ``A + V``
    (before whitening), then global token-weighted whitening of ``A``."""
    assert inputs.values is not None
    r = _token_rewards(inputs, params, clip_rewards(inputs.rewards, params.reward_clip))
    a, ret = gae_returns(r, inputs.values.float(), inputs.response_mask, params.gamma, params.lam, inputs.last_values)
    return Advantages(masked_whiten(a, inputs.response_mask.float(), params.reduce, eps=params.whiten_eps), ret)


@register_estimator("reinforce")
def reinforce(inputs: AdvantageInputs, params: AdvantageParams) -> Advantages:
    """Plain REINFORCE, for ablations: ``A = G``, no baseline, no normalisation."""
    r = _token_rewards(inputs, params, clip_rewards(inputs.rewards, params.reward_clip))
    g = discounted_returns(r, inputs.response_mask, params.gamma, inputs.last_values)
    return Advantages(g, g)
