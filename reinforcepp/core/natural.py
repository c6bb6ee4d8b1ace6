"""The natural policy gradient step with a KL trust region (TRPO), as pure functions.

Kakade 2001, "A Natural Policy Gradient": precondition the policy gradient by the inverse Fisher
information matrix of the policy, ``s = F^-1 g``. Schulman et al. 2015, "Trust Region Policy
Optimization" (arXiv 1502.05477, appendix C): never form ``F``; solve ``F s = g`` by conjugate
gradient with Fisher-vector products obtained by differentiating the mean KL twice
(Pearlmutter's trick), scale ``s`` to the edge of the KL ball ``0.5 s^T F s = max_kl``, then
backtrack along it until the surrogate improves and the measured KL stays inside the ball.

Every function works on a list of parameters (any ``torch.nn.Parameter`` s) and closures that
recompute a scalar from the current parameter values; none holds state or reads a config. The
trainer (``reinforcepp.gym``) strings them together; ``docs/algorithms.md``, "Trust regions:
clipping and the natural gradient", gives the equations and defaults.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor


def flat_grad(output: Tensor, params: Sequence[Tensor], *, create_graph: bool = False) -> Tensor:
    """``d output / d params`` concatenated into one vector ``(sum_j numel(params[j]),)``.

    A parameter ``output`` does not depend on gets zeros (not an error), so that a closure over
    part of a model (the Gaussian mean without ``log_std``, say) still gives a full-size vector."""
    grads = torch.autograd.grad(output, list(params), create_graph=create_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def flat_params(params: Sequence[Tensor]) -> Tensor:
    """The parameter values concatenated into one (detached) vector."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_flat_params(params: Sequence[Tensor], flat: Tensor) -> None:
    """Write the vector ``flat`` (as made by :func:`flat_params`) back into ``params``, in place."""
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} entries, the parameters {total}")
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def categorical_kl(old_logits: Tensor, logits: Tensor) -> Tensor:
    """``KL(pi_old || pi) = sum_a p_old(a) (log p_old(a) - log p(a))`` of categoricals given by
    their logits, ``(..., n)`` -> ``(...)``; the gradient flows through ``logits`` only."""
    old_logp = torch.log_softmax(old_logits.detach(), dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    return (old_logp.exp() * (old_logp - logp)).sum(-1)


def diagonal_gaussian_kl(old_mean: Tensor, old_log_std: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """``KL(N(mu_0, s_0^2) || N(mu, s^2))`` of diagonal Gaussians, summed over the last axis:
    ``sum_d [log s - log s_0 + (s_0^2 + (mu_0 - mu)^2) / (2 s^2) - 1/2]``, ``(..., d)`` -> ``(...)``
    (``log_std`` may be ``(d,)``, broadcast over the batch); the gradient flows through
    ``mean`` and ``log_std`` only."""
    old_mean, old_log_std = old_mean.detach(), old_log_std.detach()
    var_ratio = torch.exp(2.0 * (old_log_std - log_std))
    term = log_std - old_log_std + 0.5 * (var_ratio + (old_mean - mean).square() * torch.exp(-2.0 * log_std)) - 0.5
    return term.sum(-1)


def fisher_vector_product(
    kl_fn: Callable[[], Tensor], params: Sequence[Tensor], vector: Tensor, damping: float = 0.0
) -> Tensor:
    """``(F + damping I) v`` without forming ``F``, by Pearlmutter's trick:
    ``F v = grad_theta [ (grad_theta KL(pi_old || pi_theta)) . v ]``.

    At ``theta = theta_old`` the Hessian of the mean KL is the Fisher information matrix
    ``F = E_s[ E_a[ grad log pi grad log pi^T ] ]`` (Schulman et al. 2015, appendix C.1), so two
    backward passes give ``F v`` exactly. ``damping`` (TRPO's ``cg_damping``) adds ``damping * v``,
    which keeps the system well posed where ``F`` is singular (the softmax's all-ones direction).

    Args:
        kl_fn: recomputes the scalar mean KL of the *frozen* old distribution to the current
            one, with a graph through ``params`` (e.g. ``categorical_kl(old_logits, logits).mean()``).
        params: the parameters ``theta``.
        vector: ``v``, ``(sum_j numel(params[j]),)``.
    Returns:
        ``(F + damping I) v``, the shape of ``vector``.
    """
    grad = flat_grad(kl_fn(), params, create_graph=True)
    product = flat_grad((grad * vector.detach()).sum(), params)
    return product + damping * vector


def conjugate_gradient(
    avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, residual_tol: float = 1e-10
) -> Tensor:
    """Approximate ``x = A^-1 b`` for a symmetric positive-definite ``A`` known only through
    ``avp(v) = A v`` (Hestenes and Stiefel 1952; TRPO solves ``F x = g`` this way).

    Starting from ``x_0 = 0``: ``r_0 = p_0 = b``; per iteration ``alpha = r^T r / p^T A p``,
    ``x += alpha p``, ``r -= alpha A p``, ``p = r + (r_new^T r_new / r^T r) p``; it stops after
    ``iters`` iterations or once ``r^T r < residual_tol``. In exact arithmetic an ``n x n`` system
    is solved after ``n`` iterations.
    """
    if iters < 1:
        raise ValueError(f"conjugate_gradient needs iters >= 1, got {iters}")
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = torch.dot(r, r)
    for _ in range(iters):
        if float(rr) < residual_tol:
            break
        ap = avp(p)
        alpha = rr / torch.dot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def scale_to_kl_radius(direction: Tensor, fisher_direction: Tensor, max_kl: float) -> Tensor:
    """The step ``beta s`` with ``beta = sqrt(2 max_kl / (s^T F s))``: the point along ``s`` where
    the quadratic model of the KL, ``0.5 (beta s)^T F (beta s)``, equals ``max_kl`` (Schulman
    et al. 2015, appendix C). ``fisher_direction`` is ``F s`` (damped, as in the solve).

    ``s`` is the conjugate-gradient solution of ``F s = g``, so ``s^T F s ~ g^T F^-1 g > 0``; a
    non-positive or non-finite curvature is refused with a ``ValueError``."""
    if max_kl <= 0:
        raise ValueError(f"max_kl must be > 0, got {max_kl}")
    curvature = float(torch.dot(direction, fisher_direction))
    if not math.isfinite(curvature) or curvature <= 0:
        raise ValueError(f"s^T F s = {curvature} is not positive: the Fisher-vector product or the step is degenerate")
    return math.sqrt(2.0 * max_kl / curvature) * direction


class LineSearch(NamedTuple):
    """What :func:`backtracking_line_search` did."""

    accepted: bool
    """a step was taken (``False``: the parameters are back where they started)."""
    fraction: float
    """the fraction of the full step taken, ``shrink^i`` (0 when none was accepted)."""
    loss: float
    """the surrogate loss at the parameters left in place."""
    improvement: float
    """``loss_before - loss`` (0 when none was accepted)."""
    kl: float
    """the measured KL at the accepted step (0 when none was accepted)."""
    tries: int
    """the fractions evaluated."""


def backtracking_line_search(
    params: Sequence[Tensor],
    full_step: Tensor,
    loss_fn: Callable[[], Tensor],
    kl_fn: Callable[[], Tensor],
    max_kl: float,
    *,
    shrink: float = 0.5,
    max_tries: int = 10,
    loss_before: float | None = None,
) -> LineSearch:
    """Try ``theta_0 + shrink^i * full_step`` for ``i = 0, 1, ..., max_tries - 1`` and keep the
    first that both **improves** the surrogate, ``loss_fn() < loss_before``, and keeps the
    **measured** KL inside the trust region, ``kl_fn() <= max_kl`` (Schulman et al. 2015,
    appendix C: the quadratic model that sized ``full_step`` can be wrong, so both are checked
    on the real functions). If no fraction passes, the parameters are restored to ``theta_0``.

    Args:
        params: the parameters ``theta`` (changed in place).
        full_step: ``(sum_j numel(params[j]),)``, already pointing downhill for ``loss_fn``
            (e.g. ``-scale_to_kl_radius(F^-1 g, F F^-1 g, max_kl)`` for the gradient ``g`` of the loss).
        loss_fn: the surrogate loss to *decrease*, recomputed at the current ``params``.
        kl_fn: the mean KL from the old policy to the current one.
        max_kl: the trust-region radius.
        shrink: the factor per try, in ``(0, 1)``.
        max_tries: fractions to try, ``>= 1``.
        loss_before: ``loss_fn()`` at ``theta_0`` if already known (saves one evaluation).
    """
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"shrink must lie in (0, 1), got {shrink}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    start = flat_params(params)
    with torch.no_grad():
        before = float(loss_fn()) if loss_before is None else float(loss_before)
        for i in range(max_tries):
            fraction = shrink**i
            set_flat_params(params, start + fraction * full_step)
            loss, kl = float(loss_fn()), float(kl_fn())
            if math.isfinite(loss) and math.isfinite(kl) and loss < before and kl <= max_kl:
                return LineSearch(True, fraction, loss, before - loss, kl, i + 1)
        set_flat_params(params, start)
    return LineSearch(False, 0.0, before, 0.0, 0.0, max_tries)
