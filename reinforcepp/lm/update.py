"""The update: ``epochs`` x mini-batches x micro-batches of the clipped loss (docs/lm.md, "The
training step and its batch sizes"; docs/algorithms.md, "Loss aggregation, micro-batches and ranks").

Each mini-batch (a *window*) is one optimizer step, its gradient accumulated over micro-batches.
The per-token loss is the core's :func:`~reinforcepp.core.token_loss` (clipped surrogate,
importance weights, KL in the loss, entropy bonus), aggregated with the window's token and
sequence counts over every rank, so that K micro-batches on R ranks add up to exactly the
window's loss. A non-finite loss or gradient never reaches the weights (:class:`NonFiniteGuard`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Optional, cast

import numpy as np
import torch

from ..core import (
    CorrectionMode,
    PolicyLossParams,
    RolloutCorrection,
    aggregate,
    approx_kl,
    clip_fractions,
    correction_stats,
    logprob_mismatch,
    masked_mean,
    rollout_correction,
    token_loss,
    value_loss,
)
from ..run import DivergenceGuard, NonFiniteGuard
from .batch import PromptResponseBatch
from .config import LMConfig
from .experience import Experience
from .fused import HeldForwards
from .logprobs import TokenLogprobs, response_logprobs
from .micro_batches import micro_batches_of, prompt_groups, update_token_counts
from .packing import packed_response_logprobs
from .runtime import Runtime

Seen = dict[str, list[torch.Tensor]]
"""Per-token tensors of every micro-batch of the update, for its metrics."""
Scalars = dict[str, list[float]]
"""Scalars of every window (loss, gradient norm, ...), for its metrics."""


def lr_lambda(config: LMConfig, total_optimizer_steps: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup_steps``, then constant or cosine down to ``lr_min_ratio``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_optimizer_steps - config.warmup_steps))
        return config.lr_min_ratio + (1 - config.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class PolicyUpdate:
    """The optimizers and the update of one run.

    Args:
        config: the run's config.
        rt: the runtime (device, ranks, parallelism, precision, timer).
        models: the run's :class:`~.components.Models`.
        kl_controller: holds beta (``.value``).
    """

    def __init__(self, config: LMConfig, rt: Runtime, models: Any, kl_controller: Any) -> None:
        self.config, self.rt, self.models, self.kl_controller = config, rt, models, kl_controller
        self.kl_placement = config.effective_kl_placement
        trained = [p for p in models.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
        self.num_mini_batches = config.rollout_size // config.mini_batch_responses
        total_opt_steps = config.total_steps * config.epochs * self.num_mini_batches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, total_opt_steps))
        critic = models.critic
        self.critic_optimizer = (torch.optim.AdamW(critic.parameters(), lr=config.critic_lr)
                                 if critic is not None else None)
        self.guard = NonFiniteGuard(config.max_nonfinite_steps,
                                    hint="Lower lr, check the rewards, or use dtype=float32.")
        self.trained = trained
        self.divergence = DivergenceGuard(config.max_weight_growth, trained,
                                          hint="Lower lr (or raise max_weight_growth).")
        self.held = HeldForwards()  # the update's forwards, run early when old_logprobs come from them
        self.loss_params = PolicyLossParams(config.eps_low, config.eps_high, config.dual_clip,
                                            config.importance_sampling_level, config.cispo_eps_low,
                                            config.cispo_eps_high, config.clip_cov_ratio, config.clip_cov_lb,
                                            config.clip_cov_ub, config.kl_cov_ratio, config.kl_cov_coef)
        self.weights_changed = False  # an optimizer step changed the policy since the engine's last sync
        self.step = 0  # the RL step, for messages

    def forward(self, b: PromptResponseBatch) -> TokenLogprobs:
        """The update's forward: log-probs and entropy of a micro-batch, with gradient (on one
        packed row with ``pack_sequences``)."""
        cfg, dev = self.config, self.rt.device
        fn = packed_response_logprobs if cfg.pack_sequences else response_logprobs
        with self.rt.precision():
            return fn(self.models.train_policy, b.input_ids.to(dev), b.attention_mask.to(dev), b.response_length,
                      with_entropy=True, chunk_size=cfg.logprob_chunk_size, temperature=cfg.temperature,
                      entropy_grad=cfg.entropy_coef != 0, share_prompt=cfg.share_prompt)

    def __call__(self, exp: Experience, step: int) -> dict[str, float]:
        """``epochs`` passes; each mini-batch is one optimizer step accumulated over
        micro-batches, with the loss normalised by the mini-batch's token/sequence counts so
        that the accumulated gradient equals the full mini-batch gradient."""
        cfg = self.config
        self.step = step
        if cfg.trust_region == "natural":
            return self.natural(exp, step)
        seen: Seen = defaultdict(list)
        scalars: Scalars = defaultdict(list)
        with self.rt.timer("update"):
            for _epoch in range(cfg.epochs):
                order = (self.shuffled_groups(len(exp)) if cfg.epochs > 1 or self.num_mini_batches > 1
                         else torch.arange(len(exp)))
                for window in order.tensor_split(self.num_mini_batches):
                    self.optimizer_step(exp.select(window), seen, scalars)
        metrics = self.metrics(seen, scalars)
        metrics["policy/weight_norm"] = self.divergence.check(self.trained, where=f"step {step}")
        return metrics

    def natural(self, exp: Experience, step: int) -> dict[str, float]:
        """``trust_region=natural``: one natural-gradient step of the policy (natural.py), then the
        critic's own epochs (gae)."""
        from .natural import NaturalStep, critic_epochs

        scalars: Scalars = defaultdict(list)
        with self.rt.timer("update"):
            out = NaturalStep(self)(exp, step)
            if self.models.critic is not None:
                out.update(critic_epochs(self, exp, self.shuffled_groups))
        self.count_padding(exp, micro_batches_of(exp.batch, self.config, self.rt.dist), scalars)
        real, computed = float(sum(scalars["update/real_tokens"])), float(sum(scalars["update/computed_tokens"]))
        out.update({"nonfinite/skipped_steps": float(self.guard.total), "update/real_tokens": real,
                    "update/padding_fraction": 1.0 - self.rt.dist.sum(real) / max(1.0, self.rt.dist.sum(computed))})
        return out

    def shuffled_groups(self, n: int) -> torch.Tensor:
        """A random order of the ``n`` responses that keeps each prompt's samples together, so
        micro-batches hold whole groups and ``share_prompt`` computes each prompt once."""
        k = self.config.samples_per_prompt
        groups = torch.randperm(n // k)
        return (groups[:, None] * k + torch.arange(k)).flatten()

    def optimizer_step(self, window: Experience, seen: Seen, scalars: Scalars) -> None:
        """One window: accumulate the micro-batches' gradients, clip, check, step."""
        dist = self.rt.dist
        if len(window) == 0 and not dist.enabled:
            return  # dynamic filtering left fewer responses than mini-batches
        lm = window.loss_mask_or_response_mask
        n_tokens = dist.sum(float(lm.sum()))  # the global window's counts
        n_seqs = dist.sum(float((lm.sum(1) > 0).sum()))
        if n_tokens == 0:  # mask_truncated_completions left no token of this window in the loss
            scalars["loss/empty_windows"].append(1.0)
            return
        total = self.accumulate(window, n_tokens, n_seqs, seen, scalars)
        grad_norm = self.rt.parallel.clip_grad_norm(self.models.policy.parameters(), self.config.max_grad_norm)
        if not self.guard.check(total, grad_norm, where=f"step {self.step}"):
            self.zero_grad()
            return
        self.optimizer.step()
        self.weights_changed = True
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        scalars["loss/policy"].append(float(total))
        scalars["grad_norm"].append(float(grad_norm))
        if self.critic_optimizer is not None:
            critic_norm = self.rt.parallel.clip_grad_norm(self.models.critic.parameters(), self.config.max_grad_norm)
            scalars["critic/grad_norm"].append(float(critic_norm))
            self.critic_optimizer.step()
            self.critic_optimizer.zero_grad(set_to_none=True)

    def accumulate(self, window: Experience, n_tokens: float, n_seqs: float, seen: Seen,
                   scalars: Scalars) -> torch.Tensor:
        """Backward of every micro-batch of ``window``; returns the window's loss summed over ranks."""
        cfg, rt, models = self.config, self.rt, self.models
        total = torch.zeros(())
        starts = {key: len(scalars[key]) for key in ("loss/kl", "loss/entropy_bonus")}
        micro = micro_batches_of(window.batch, cfg, rt.dist)
        self.count_padding(window, micro, scalars)
        # DDP/FSDP2 reduce the gradients in backward
        with rt.parallel.accumulate(models.train_policy, models.train_critic):
            for rows in micro:
                part = window.select(torch.tensor(rows or [0], dtype=torch.long))
                loss = self.micro_loss(part, n_tokens, n_seqs, seen if rows else defaultdict(list),
                                       scalars if rows else defaultdict(list))
                if not rows:  # an empty micro-batch of a rank with fewer rows: a forward like the other ranks', no loss
                    loss = loss * 0.0
                (loss * rt.parallel.loss_scale).backward()
                total = total + loss.detach()
                if models.critic is not None:
                    self.critic_backward(part, n_tokens, scalars, scale=1.0 if rows else 0.0)
        for key, on in (("loss/kl", self.kl_placement == "loss"), ("loss/entropy_bonus", bool(cfg.entropy_coef))):
            if on:  # the micro-batch parts of a term (on every rank) add up to the window's term
                scalars[key][starts[key]:] = [rt.dist.sum(float(sum(scalars[key][starts[key]:])))]
        return torch.tensor(rt.dist.sum(float(total)))

    def zero_grad(self) -> None:
        """Drop the gradients of a skipped step (policy and critic)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)

    def micro_loss(self, part: Experience, n_tokens: float, n_seqs: float, seen: Seen,
                   scalars: Scalars) -> torch.Tensor:
        """The aggregated loss of one micro-batch (its share of the window's loss), recording
        what the metrics need in ``seen`` and ``scalars``."""
        cfg = self.config
        out = self.held.take(part.batch.input_ids)
        if out is None:
            out = self.forward(part.batch)
        assert out.entropy is not None  # with_entropy=True
        logp = out.logprobs.cpu() if self.rt.device.type == "cpu" else out.logprobs
        real = part.batch.response_mask.to(logp.device)
        # without truncated responses under mask_truncated_completions
        mask = part.loss_mask_or_response_mask.to(logp.device)
        old = part.old_logprobs.to(logp.device) if part.old_logprobs is not None else logp.detach()
        weights = None
        if part.sampler_logprobs is not None:
            sampler = part.sampler_logprobs.to(logp.device)
            seen["sampler_logprobs"].append(sampler.cpu())
            correction = self.correction(old, sampler, real)
            if correction is not None:  # pi_old / mu, truncated or masked, no gradient
                weights = correction.weights
                for name, value in zip(("is_weights", "is_masked", "is_log_ratio", "is_truncated"), correction):
                    seen[name].append(value.detach().cpu())
        in_loss = self.kl_placement == "loss"
        assert not in_loss or part.ref_logprobs is not None  # loss KL needs the reference
        ref = part.ref_logprobs.to(logp.device) if in_loss and part.ref_logprobs is not None else None
        terms = token_loss(logp, old, part.advantages.to(logp.device), real, policy=cfg.policy_loss,
                           params=self.loss_params, is_weights=weights, ref_logprobs=ref,
                           kl_coef=self.kl_controller.value, kl_estimator=cfg.resolved_kl_estimator,
                           entropy=out.entropy, entropy_coef=cfg.entropy_coef)
        # the per-token terms are zeroed outside the loss mask; normalisers count the loss mask's tokens and sequences
        agg = lambda x: aggregate(  # noqa: E731
            x * mask, real, cfg.resolved_loss_agg, num_tokens=n_tokens, num_sequences=n_seqs,
            max_response_length=cfg.max_new_tokens)
        if terms.kl is not None:
            scalars["loss/kl"].append(float(agg(terms.kl.detach())))
            seen["kl"].append(terms.kl.detach().cpu())
        if cfg.entropy_coef:
            # the term added to the loss
            scalars["loss/entropy_bonus"].append(-cfg.entropy_coef * float(agg(out.entropy.detach())))
        pl = terms.policy
        if pl.selected is not None:
            seen["selected"].append((pl.selected & real.bool()).cpu())
        for name, value in (("logprobs", logp), ("old_logprobs", old), ("clipped_low", pl.clipped_low),
                            ("clipped_high", pl.clipped_high), ("entropy", out.entropy), ("mask", mask),
                            ("real", real)):
            seen[name].append(value.detach().cpu())
        return agg(terms.loss)

    def correction(self, old: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> Optional[RolloutCorrection]:
        """The off-policy correction ``w = pi_old / mu`` of a micro-batch (core.rollout_correction),
        or None when ``rollout_correction`` is none."""
        cfg = self.config
        mode = cfg.resolved_rollout_correction
        if mode == "none":
            return None
        low = cfg.rollout_correction_low if mode == "mask" else None
        return rollout_correction(old, sampler, mask, cast(CorrectionMode, mode), cfg.rollout_correction_level, low=low,
                                  high=cfg.rollout_correction_high)

    def count_padding(self, window: Experience, micro: list[list[int]], scalars: Scalars) -> None:
        """Tokens the update's forwards of ``window`` compute, and of those the real ones
        (``update/padding_fraction``: packed forwards compute no padding)."""
        cfg, b = self.config, window.batch
        if len(window) == 0:
            return
        groups = prompt_groups(b.input_ids, b.response_length) if cfg.share_prompt else None
        computed, real = update_token_counts(b.attention_mask, b.response_length, [r for r in micro if r],
                                             packed=cfg.pack_sequences, groups=groups)
        scalars["update/computed_tokens"].append(float(computed))
        scalars["update/real_tokens"].append(float(real))

    def critic_backward(self, part: Experience, n_tokens: float, scalars: Scalars, scale: float = 1.0) -> None:
        """The clipped value loss of one micro-batch (token-mean over the window), backward
        (``scale=0``: an empty micro-batch's forward, contributing nothing)."""
        rt, b = self.rt, part.batch
        assert self.models.train_critic is not None and part.values is not None and part.returns is not None
        with rt.precision():
            values = self.models.train_critic(b.input_ids.to(rt.device), b.attention_mask.to(rt.device),
                                              b.response_length, packed=self.config.pack_sequences).float().cpu()
        vl = value_loss(values, part.values, part.returns, self.config.value_clip)
        loss = aggregate(vl, b.response_mask, "token-mean", num_tokens=n_tokens) * scale
        (loss * rt.parallel.loss_scale).backward()
        if scale:
            scalars["loss/value"].append(float(loss.detach()))

    def metrics(self, seen: Seen, scalars: Scalars) -> dict[str, float]:
        """The update's metrics: loss, clip fractions, ``approx_kl``, entropy, gradient norm,
        learning rate, skipped steps; the sampler mismatch, the off-policy correction and the KL
        of the loss when present."""
        mask = torch.cat(seen["mask"])
        logp, old = torch.cat(seen["logprobs"]), torch.cat(seen["old_logprobs"])
        low, high = clip_fractions(torch.cat(seen["clipped_low"]), torch.cat(seen["clipped_high"]), mask)
        mean = lambda key: float(np.mean(scalars[key])) if scalars[key] else float("nan")  # noqa: E731
        out = {
            "loss/policy": mean("loss/policy"), "clip/frac_low": low, "clip/frac_high": high,
            "approx_kl": approx_kl(logp, old, mask), "entropy": float(masked_mean(torch.cat(seen["entropy"]), mask)),
            "grad_norm": mean("grad_norm"), "lr": float(self.scheduler.get_last_lr()[0]),
            "nonfinite/skipped_steps": float(self.guard.total),
        }
        if seen["sampler_logprobs"]:  # sampler vs trainer: the same tokens, two sets of numerics
            sampler = torch.cat(seen["sampler_logprobs"])
            mismatch = logprob_mismatch(old, sampler, mask, self.rt.dist.reduce)
            out["rollout/logprob_abs_diff_mean"], out["rollout/logprob_abs_diff_max"] = mismatch
        if seen["is_weights"]:
            parts = RolloutCorrection(*(torch.cat(seen[k])
                                        for k in ("is_weights", "is_masked", "is_log_ratio", "is_truncated")))
            out.update(correction_stats(parts, torch.cat(seen["real"]), self.rt.dist.reduce))
        if self.kl_placement == "loss":
            kl = torch.cat(seen["kl"])
            out["kl/mean_token"] = float(masked_mean(kl, mask))
            out["kl/mean_sequence"] = float((kl * mask).sum() / mask.shape[0])
        for key in ("loss/kl", "loss/entropy_bonus", "loss/value", "critic/grad_norm"):
            if scalars[key]:
                out[key] = mean(key)
        if seen["selected"]:  # clip_cov / kl_cov: the share of real tokens they acted on
            out["loss/selected_fraction"] = float(torch.cat(seen["selected"]).sum()) / max(1.0, float(mask.sum()))
        if scalars["loss/empty_windows"]:
            out["loss/empty_windows"] = float(len(scalars["loss/empty_windows"]))
        computed, real = (float(sum(scalars[k])) for k in ("update/computed_tokens", "update/real_tokens"))
        out["update/real_tokens"] = real  # this rank's, for its FLOP count (the trainer takes it out)
        computed, real = self.rt.dist.sum(computed), self.rt.dist.sum(real)
        out["update/padding_fraction"] = 1.0 - real / computed if computed else 0.0
        return out
