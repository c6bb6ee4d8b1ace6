"""Experience: one rollout turned into everything the update needs.

The experience part of the training step (docs/lm.md, "The training step and its batch sizes"):
forward passes without gradient (``old_logprobs``, ``ref_logprobs``, ``values``), then shaped
rewards, returns and advantages on the whole batch (docs/algorithms.md, "The pipeline, in order",
:class:`ExperienceMaker`). Only here is the estimator named, and only to pass its name to
:func:`reinforcepp.core.compute_advantages`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..agents.rollout import split_turn_rewards
from ..config import ConfigError
from ..core import (
    AdvantageInputs,
    AdvantageParams,
    EstimatorSpec,
    compute_advantages,
    distillation_token_rewards,
    kl_penalty,
    truncated_loss_mask,
)
from ..remote import RemoteReference
from .batch import PromptResponseBatch, collate
from .config import LMConfig
from .fused import HeldForwards
from .logprobs import TokenLogprobs, response_logprobs
from .micro_batches import micro_batches_of
from .packing import packed_response_logprobs


@dataclass
class Experience:
    """``N`` responses; every tensor is ``(N, T)`` or ``(N,)``."""

    batch: PromptResponseBatch
    rewards: Tensor
    """``(N,)`` scalar reward ``R_i`` after length penalties (before baseline and clip)."""
    advantages: Tensor
    returns: Tensor
    old_logprobs: Optional[Tensor] = None
    """``None`` when the update is exactly on-policy: the update's own log-probs are used."""
    ref_logprobs: Optional[Tensor] = None
    values: Optional[Tensor] = None
    kl: Optional[Tensor] = None
    """``(N, T)`` KL(old || ref) per token when the KL goes in the reward (logged)."""
    loss_mask: Optional[Tensor] = None
    """``(N, T)`` the tokens that enter the loss when they are not all real response tokens
    (``mask_truncated_completions``); ``None``: the response mask."""
    sampler_logprobs: Optional[Tensor] = None
    """``(N, T)`` log-probs the engine sampled the tokens with (``None`` if it does not report them)."""
    token_versions: Optional[Tensor] = None
    """``(N, T)`` long: the policy version that sampled each token (``None``: not reported)."""
    teacher_logprobs: Optional[Tensor] = None
    """``(N, T)`` the distillation teacher's log-probs of the sampled tokens (``teacher``)."""

    def __len__(self) -> int:
        return self.rewards.shape[0]

    @property
    def response_mask(self) -> Tensor:
        return self.batch.response_mask

    @property
    def loss_mask_or_response_mask(self) -> Tensor:
        return self.response_mask if self.loss_mask is None else self.loss_mask

    def select(self, index: Tensor) -> "Experience":
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PromptResponseBatch):
                picked[f.name] = value.select(index)
            else:
                picked[f.name] = None if value is None else value[index]
        return Experience(**picked)


@torch.no_grad()
def batched_forward(fn, batch: PromptResponseBatch, micro: list[list[int]], device: torch.device) -> Tensor:
    """Apply ``fn(input_ids, attention_mask, response_length) -> (b, T)`` micro-batch by
    micro-batch (``micro``: row indices) and gather the results in row order, ``(N, T)`` on the
    CPU. An empty micro-batch (every rank must run as many forwards as the others) runs the
    first row and discards it."""
    out = torch.zeros(batch.response_mask.shape)
    for rows in micro:
        index = torch.tensor(rows or [0], dtype=torch.long)
        values = fn(batch.input_ids[index].to(device), batch.attention_mask[index].to(device),
                    batch.response_length).float().cpu()
        if rows:
            out[index] = values
    return out


class ExperienceMaker:
    """Turns a :class:`~.rollout.Rollout` into an :class:`Experience`.

    Args:
        config: the run's config.
        models: the run's :class:`~.components.Models`.
        spec: the estimator.
        kl_controller: holds beta (``.value``).
        forward: the update's forward with gradient (``PolicyUpdate.forward``), run early when
            ``fuse_old`` takes ``old_logprobs`` from it (fused.py).
        fuse_old: take ``old_logprobs`` from the update's forwards (held in ``held``).
        precision: the autocast context of the forwards.
        timer: the run's phase timer (a fused forward counts as update time).
        dist: the ranks (global whitening, micro-batches in step).
    """

    def __init__(self, config: LMConfig, models: Any, spec: EstimatorSpec, kl_controller: Any, *, device: torch.device,
                 forward: Callable[[PromptResponseBatch], TokenLogprobs], held: HeldForwards, fuse_old: bool,
                 precision: Callable[[], Any], timer: Any, dist: Any) -> None:
        self.config, self.models, self.spec, self.kl_controller = config, models, spec, kl_controller
        self.device, self.forward, self.held, self.fuse_old = device, forward, held, fuse_old
        self.precision, self.timer, self.dist, self.reduce = precision, timer, dist, dist.reduce
        self.kl_placement = config.effective_kl_placement

    def logprob_fn(self, model: Any) -> Callable[[Tensor, Tensor, int], Tensor]:
        """``(input_ids, attention_mask, T) -> (B, T)`` log-probs under ``model``: a local causal
        LM, or a reference that computes them itself (:class:`RemoteReference`)."""
        cfg = self.config
        if isinstance(model, RemoteReference):
            return model.response_logprobs
        fn = packed_response_logprobs if cfg.pack_sequences else response_logprobs
        return lambda ids, attn, t: fn(model, ids, attn, t, chunk_size=cfg.logprob_chunk_size,
                                       temperature=cfg.temperature, share_prompt=cfg.share_prompt).logprobs

    def value_fn(self, critic: torch.nn.Module) -> Callable[[Tensor, Tensor, int], Tensor]:
        """``(input_ids, attention_mask, T) -> (B, T)`` values of the critic, packed or padded."""
        return lambda ids, attn, t: critic(ids, attn, t, packed=self.config.pack_sequences)

    def old_logprobs(self, batch: PromptResponseBatch, micro: list[list[int]]) -> Optional[Tensor]:
        """``old_logprobs`` when the update or the KL reward needs them: from the update's own
        forwards (fused) or a no-gradient pass; None when the update is exactly on-policy."""
        cfg, policy = self.config, self.models.policy
        if cfg.on_policy and self.kl_placement != "reward" and self.models.teacher is None:
            return None
        if self.fuse_old:
            with self.timer("update"):
                return self.held.run(self.forward, batch, micro)
        policy.eval()
        with self.precision():
            old = batched_forward(self.logprob_fn(policy), batch, micro, self.device)
        policy.train()
        return old

    def __call__(self, rollout: Any) -> Experience:
        """Forward passes without gradient, then shaped rewards, returns and advantages."""
        cfg, models = self.config, self.models
        gen = rollout.generation
        batch = collate(gen.prompt_ids, gen.response_ids, models.tokenizer.pad_token_id,
                        response_masks=gen.response_masks)
        micro = micro_batches_of(batch, cfg, self.dist)
        old = self.old_logprobs(batch, micro)
        with self.precision():
            ref = (batched_forward(self.logprob_fn(models.reference), batch, micro, self.device)
                   if models.reference is not None else None)
            values = None
            if models.critic is not None:
                values = batched_forward(self.value_fn(models.critic), batch, micro, self.device) * batch.response_mask
        kl = None
        if self.kl_placement == "reward":
            assert old is not None and ref is not None  # reward KL computes both
            kl = kl_penalty(old, ref, cfg.resolved_kl_estimator) * batch.response_mask
        rewards, steps = self.scalar_and_step_rewards(rollout, batch)
        teacher = None
        if models.teacher is not None:  # on-policy distillation: -(logp - teacher_logp) on every sampled token
            assert old is not None
            with self.precision():
                teacher = batched_forward(self.logprob_fn(models.teacher), batch, micro, self.device)
            distill = cfg.teacher_coef * distillation_token_rewards(old, teacher, batch.response_mask)
            steps = distill if steps is None else steps + distill
        inputs = AdvantageInputs(rewards, batch.response_mask, cfg.samples_per_prompt, kl=kl, values=values,
                                 step_rewards=steps)
        params = AdvantageParams(gamma=cfg.gamma, lam=cfg.lam, kl_coef=self.kl_controller.value,
                                 reward_clip=cfg.reward_clip, whiten=cfg.rloo_whiten, scale_rewards=cfg.scale_rewards,
                                 reduce=self.reduce)
        adv = compute_advantages(cfg.estimator, inputs, params)
        loss_mask = truncated_loss_mask(batch.response_mask, gen.truncated) if cfg.mask_truncated_completions else None
        sampler = gen.sampler_logprob_tensor(batch.response_length)
        mode = cfg.resolved_rollout_correction
        if mode != "none" and sampler is None:
            raise ConfigError(f"rollout_correction={mode} needs the log-probs the engine sampled with, and "
                              f"engine {cfg.engine!r} does not return them: set rollout_correction=none")
        return Experience(batch, rollout.rewards, adv.advantages, adv.returns, old, ref, values, kl,
                          loss_mask=loss_mask, sampler_logprobs=sampler,
                          token_versions=gen.token_version_tensor(batch.response_length), teacher_logprobs=teacher)

    def scalar_and_step_rewards(self, rollout: Any, batch: PromptResponseBatch) -> tuple[Tensor, Optional[Tensor]]:
        """``R_i`` ``(N,)`` and the per-token step rewards ``(N, T)`` (process rewards, and the
        earlier turns' rewards of multi-turn episodes for token-level estimators), or None."""
        steps = None
        if rollout.token_rewards is not None:
            steps = torch.zeros_like(batch.response_mask)
            for i, row in enumerate(rollout.token_rewards):
                steps[i, : len(row)] = torch.tensor(row[: steps.shape[1]])
        rewards, turn_steps = split_turn_rewards(rollout.rewards, rollout.generation, batch.response_length,
                                                 self.spec.kl_in_reward)
        if turn_steps is not None:
            steps = turn_steps if steps is None else steps + turn_steps
        return rewards, steps
