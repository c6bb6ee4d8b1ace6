"""``trust_region=natural`` for language models: one TRPO step of the policy per rollout.

docs/algorithms.md, "Trust regions: clipping and the natural gradient". Over the rollout's
response tokens (aggregated as the clipped loss is: ``loss_agg``, the window's counts over every
rank), the surrogate is

    ``L(theta) = agg( -w r A  [+ beta kl(logp, ref_logp)] ),  r = exp(logp - old_logp)``

(``w``: the off-policy correction, 1 without one). The step is the core's
(:mod:`reinforcepp.core.natural`): ``g = grad L``, ``s ~ (F + cg_damping I)^-1 g`` by conjugate
gradient on Fisher-vector products of the token-mean KL of the full next-token distributions,
``KL(sg(p_theta) || p_theta)`` (its Hessian at ``theta`` is the Fisher matrix; value and
gradient 0), the step ``-beta s`` scaled to ``max_kl``, then the backtracking line search keeps
the first fraction that lowers ``L`` with a KL estimate to the start (``k3`` on the rollout's
tokens, as ``approx_kl``) at most ``max_kl``. Every sum runs micro-batch by micro-batch and is
all-reduced over the ranks, so every rank takes the same step. The critic (``gae``) keeps its
own optimizer, ``epochs`` passes of mini-batches of the value loss.

The step runs the policy with eager attention (:func:`eager_attention`): the Fisher-vector
product differentiates twice, which PyTorch's fused attention kernels do not support on a CPU.
"""

from __future__ import annotations

import functools

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..core import (
    aggregate,
    approx_kl,
    backtracking_line_search,
    categorical_kl,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    kl_loss,
    masked_mean,
    scale_to_kl_radius,
)
from ..engines.kv_cache import unwrap
from .experience import Experience
from .logprobs import logprobs_from_logits, response_logits
from .micro_batches import micro_batches_of


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """``model``'s attention computed by plain matmuls and softmax for the duration (twice
    differentiable), whatever implementation it was built with."""
    config = unwrap(model).config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


class NaturalStep:
    """The natural step of :class:`~.update.PolicyUpdate` (its config, runtime, models, beta,
    guard and correction); ``__call__`` updates the policy in place and returns the metrics."""

    def __init__(self, update: Any) -> None:
        self.update = update
        self.config, self.rt, self.models = update.config, update.rt, update.models

    def __call__(self, exp: Experience, step: int) -> dict[str, float]:
        with eager_attention(self.models.policy):
            return self.step(exp, step)

    def step(self, exp: Experience, step: int) -> dict[str, float]:
        cfg, rt = self.config, self.rt
        params = [p for p in self.models.policy.parameters() if p.requires_grad]
        parts = [exp.select(torch.tensor(rows or [0], dtype=torch.long))
                 for rows in micro_batches_of(exp.batch, cfg, rt.dist)]
        counts = [float(len(rows)) for rows in micro_batches_of(exp.batch, cfg, rt.dist)]
        lm = exp.loss_mask_or_response_mask
        n_tokens, n_seqs = rt.dist.sum(float(lm.sum())), rt.dist.sum(float((lm.sum(1) > 0).sum()))
        with torch.no_grad():
            start = [self.logprobs(part) for part in parts]
        loss = self.surrogate(parts, counts, n_tokens, n_seqs, grad=True)
        grad = self.all_reduce(flat_grad(loss, params))
        loss_value = rt.dist.sum(float(loss.detach()))
        out = {"loss/policy": loss_value, "grad_norm": float(grad.norm()), "natural/accepted_fraction": 0.0,
               "natural/step_kl": 0.0, "natural/improvement": 0.0, "natural/line_search_tries": 0.0}
        if not self.update.guard.check(loss_value, out["grad_norm"], where=f"step {step}"):
            return out

        def fvp(v: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(v)
            for part, n in zip(parts, counts):
                if n:
                    total += fisher_vector_product(functools.partial(self.fisher_kl, part, n_tokens), params, v)
            return self.all_reduce(total) + cfg.cg_damping * v

        direction = conjugate_gradient(fvp, grad, cfg.cg_iters) if out["grad_norm"] > 0 else grad
        curvature = fvp(direction)
        if float(torch.dot(direction, curvature)) > 0:  # 0 only for a zero gradient
            search = backtracking_line_search(
                params, -scale_to_kl_radius(direction, curvature, cfg.max_kl),
                lambda: torch.tensor(rt.dist.sum(float(self.surrogate(parts, counts, n_tokens, n_seqs, grad=False)))),
                lambda: torch.tensor(self.kl_to_start(parts, counts, start)), cfg.max_kl,
                shrink=cfg.line_search_shrink, max_tries=cfg.line_search_steps, loss_before=loss_value)
            out.update({"natural/accepted_fraction": search.fraction, "natural/step_kl": search.kl,
                        "natural/improvement": search.improvement, "natural/line_search_tries": float(search.tries)})
            self.update.weights_changed = self.update.weights_changed or search.accepted
        out.update(self.after(parts, counts, start))
        return out

    # ------------------------------------------------------------------ pieces
    def logits(self, part: Experience) -> torch.Tensor:
        """``(b, T, V)`` float32 logits of the part's response tokens (sampling temperature applied)."""
        cfg, dev, b = self.config, self.rt.device, part.batch
        with self.rt.precision():
            return response_logits(self.models.policy, b.input_ids.to(dev), b.attention_mask.to(dev), b.response_length,
                                   temperature=cfg.temperature).float()

    def logprobs(self, part: Experience) -> torch.Tensor:
        logits = self.logits(part)
        targets = part.batch.input_ids[:, -part.batch.response_length:].to(logits.device)
        return logprobs_from_logits(logits, targets).logprobs.cpu()

    def surrogate(self, parts: list[Experience], counts: list[float], n_tokens: float, n_seqs: float, *,
                  grad: bool) -> torch.Tensor:
        """This rank's share of ``L`` (with a graph when ``grad``)."""
        cfg, update = self.config, self.update
        total = torch.zeros(())
        with torch.set_grad_enabled(grad):
            for part, n in zip(parts, counts):
                if not n:
                    continue
                logp = self.logprobs(part)
                real, mask = part.batch.response_mask, part.loss_mask_or_response_mask
                old = part.old_logprobs if part.old_logprobs is not None else logp.detach()
                per_token = -torch.exp((logp - old).clamp(-20.0, 20.0)) * part.advantages
                if part.sampler_logprobs is not None:
                    correction = update.correction(old, part.sampler_logprobs, real)
                    per_token = per_token if correction is None else per_token * correction.weights
                if update.kl_placement == "loss" and part.ref_logprobs is not None:
                    kl = kl_loss(logp, part.ref_logprobs, cfg.resolved_kl_estimator)
                    per_token = per_token + update.kl_controller.value * kl
                total = total + aggregate(per_token * mask, real, cfg.resolved_loss_agg, num_tokens=n_tokens,
                                          num_sequences=n_seqs, max_response_length=cfg.max_new_tokens)
        return total

    def fisher_kl(self, part: Experience, n_tokens: float) -> torch.Tensor:
        """This part's share of the token-mean ``KL(sg(p) || p)`` over the rollout's real tokens."""
        logits = self.logits(part)
        kl = categorical_kl(logits.detach(), logits).cpu()
        return (kl * part.batch.response_mask).sum() / n_tokens

    def kl_to_start(self, parts: list[Experience], counts: list[float], start: list[torch.Tensor]) -> float:
        """The ``k3`` estimate of ``KL(pi_start || pi)`` over the rollout's real tokens, every rank's."""
        num = den = 0.0
        with torch.no_grad():
            for part, n, before in zip(parts, counts, start):
                if n:
                    x = (self.logprobs(part) - before) * part.batch.response_mask
                    num += float(((torch.exp(x) - 1 - x) * part.batch.response_mask).sum())
                    den += float(part.batch.response_mask.sum())
        num, den = self.rt.dist.sum(num), self.rt.dist.sum(den)
        return num / den if den else 0.0

    def after(self, parts: list[Experience], counts: list[float], start: list[torch.Tensor]) -> dict[str, float]:
        """``approx_kl`` and entropy of the policy after the step, over the rollout's tokens."""
        kept = [(p, s) for p, n, s in zip(parts, counts, start) if n]
        with torch.no_grad():
            outs = []
            for p, _ in kept:
                z = self.logits(p)
                outs.append(logprobs_from_logits(z, p.batch.input_ids[:, -p.batch.response_length:].to(z.device),
                                                 with_entropy=True))
            logp = torch.cat([o.logprobs.cpu() for o in outs])
            entropy = torch.cat([o.entropy.cpu() for o in outs if o.entropy is not None])
        mask = torch.cat([p.batch.response_mask for p, _ in kept])
        return {"approx_kl": approx_kl(logp, torch.cat([s for _, s in kept]), mask),
                "entropy": float(masked_mean(entropy, mask))}

    def all_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        """The sum of ``flat`` over the ranks (the identity on one process)."""
        if not self.rt.dist.enabled:
            return flat
        from ..core import all_reduce_sum

        return all_reduce_sum(flat.double()).to(flat.dtype)


def critic_epochs(update: Any, exp: Experience, shuffled: Callable[[int], torch.Tensor]) -> dict[str, float]:
    """The critic's ``epochs`` passes of mini-batches of the clipped value loss with its own optimizer
    (``trust_region=natural`` steps the policy alone)."""
    cfg, rt, models = update.config, update.rt, update.models
    losses = []
    for _epoch in range(cfg.epochs):
        for window in shuffled(len(exp)).tensor_split(update.num_mini_batches):
            part = exp.select(window)
            n_tokens = rt.dist.sum(float(part.response_mask.sum()))
            scalars: dict[str, list[float]] = {"loss/value": []}
            with rt.parallel.accumulate(models.train_critic):
                for rows in micro_batches_of(part.batch, cfg, rt.dist):
                    update.critic_backward(part.select(torch.tensor(rows or [0], dtype=torch.long)), n_tokens, scalars,
                                           scale=1.0 if rows else 0.0)
            norm = rt.parallel.clip_grad_norm(models.critic.parameters(), cfg.max_grad_norm)
            if update.guard.check(sum(scalars["loss/value"]), norm, where="critic", reset=False):
                update.critic_optimizer.step()
                losses.append(sum(scalars["loss/value"]))
            update.critic_optimizer.zero_grad(set_to_none=True)
    return {"loss/value": sum(losses) / len(losses)} if losses else {}
