"""Masked statistics computed from sums, so a batch split over micro-batches or ranks gives
exactly the numbers of the whole batch.

Every function takes an optional ``reduce`` hook: a function that receives a 1-D float64
tensor of partial sums and returns the sums over the whole (global) batch. On one process it
is the identity; under ``torch.distributed`` it is :func:`all_reduce_sum`. Means are never
averaged across parts: the sums are reduced, then divided.

Variance is computed in two passes (mean first, then the sum of squared deviations), which is
exact and numerically stable, at the cost of a second reduction.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]
"""Maps a 1-D tensor of partial sums to the global sums (e.g. an all-reduce)."""


def identity_reduce(sums: Tensor) -> Tensor:
    """The single-process reduction: the partial sums already are the global sums."""
    return sums


def all_reduce_sum(sums: Tensor) -> Tensor:
    """All-reduce (sum) over the default ``torch.distributed`` process group, if one exists.

    Imports nothing and initialises nothing: when no process group is initialised it returns
    ``sums`` unchanged.
    """
    import torch.distributed as dist  # local: keep module import free of distributed state

    if dist.is_available() and dist.is_initialized():
        sums = sums.clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


def _check(x: Tensor, mask: Tensor) -> None:
    if x.shape != mask.shape:
        raise ValueError(f"values {tuple(x.shape)} and mask {tuple(mask.shape)} differ in shape")


def _reduced(parts: list[Tensor], reduce: Optional[Reduce]) -> Tensor:
    sums = torch.stack([p.to(torch.float64) for p in parts])
    return sums if reduce is None else reduce(sums)


def masked_sum(x: Tensor, mask: Tensor, reduce: Optional[Reduce] = None) -> Tensor:
    """``sum_{i,t} x[i,t] * mask[i,t]`` over the global batch. Returns a float64 scalar.

    Args:
        x: ``(N, T)`` (or any shape) values.
        mask: same shape, 1 on real entries, 0 on padding.
    """
    _check(x, mask)
    return _reduced([(x.double() * mask).sum()], reduce)[0]


def masked_mean(x: Tensor, mask: Tensor, reduce: Optional[Reduce] = None) -> Tensor:
    """``mu = sum(x * mask) / sum(mask)`` over the global batch; float32 scalar.

    Raises ``ValueError`` when the global mask is all zero (there is nothing to average).
    """
    _check(x, mask)
    s, n = _reduced([(x.double() * mask).sum(), mask.double().sum()], reduce)
    if n <= 0:
        raise ValueError("masked_mean: the mask selects no element (all-zero response_mask)")
    return (s / n).float()


def masked_var(x: Tensor, mask: Tensor, reduce: Optional[Reduce] = None) -> Tensor:
    """Population variance ``sum(mask * (x - mu)^2) / sum(mask)`` over the global batch."""
    mu = masked_mean(x, mask, reduce)
    return masked_mean((x.double() - mu.double()).square(), mask, reduce)


def masked_mean_var(x: Tensor, mask: Tensor, reduce: Optional[Reduce] = None) -> tuple[Tensor, Tensor]:
    """Both the masked mean and population variance (two reductions)."""
    mu = masked_mean(x, mask, reduce)
    var = masked_mean((x.double() - mu.double()).square(), mask, reduce)
    return mu, var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    reduce: Optional[Reduce] = None,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Global whitening ``(x - mu) / sqrt(max(var, eps))``, token-weighted.

    ``mu`` and ``var`` are the masked mean and population variance over every real element of
    the global batch (a long response contributes more tokens). Padding positions of the
    result are 0. With ``shift_mean=False`` only the scale is changed.

    Args:
        x: ``(N, T)`` values (returns, advantages).
        mask: ``(N, T)`` response mask.
    Returns:
        ``(N, T)`` tensor, ``x.dtype``.
    """
    mu, var = masked_mean_var(x, mask, reduce)
    centred = x - mu.to(x.dtype) if shift_mean else x
    return centred * torch.rsqrt(var.clamp_min(eps)).to(x.dtype) * mask


def sequence_whiten(x: Tensor, reduce: Optional[Reduce] = None, *, eps: float = 1e-8) -> Tensor:
    """Sample-weighted whitening of one value per response, ``(N,)`` -> ``(N,)``.

    The option named as such in the spec: each response counts once, whatever its length.
    """
    ones = torch.ones_like(x)
    mu, var = masked_mean_var(x, ones, reduce)
    return (x - mu.to(x.dtype)) * torch.rsqrt(var.clamp_min(eps)).to(x.dtype)
