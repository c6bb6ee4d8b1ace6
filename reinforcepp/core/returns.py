"""Discounted returns and Generalised Advantage Estimation over right-padded sequences.

Each function has two forms that must agree: a vectorised one (a reverse scan over time, all
sequences at once; used by the trainers) and a ``*_loop`` reference written element by element
from the equation (used by the tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _bootstrap(token_rewards: Tensor, response_mask: Tensor, gamma: float, last_values: Optional[Tensor]) -> Tensor:
    """Add ``gamma * V(s_{T_i})`` to the last real reward of each sequence (0 = terminal)."""
    if last_values is None:
        return token_rewards
    from .shaping import last_token_index

    last = last_token_index(response_mask)
    rows = torch.arange(token_rewards.shape[0], device=token_rewards.device)
    return token_rewards.index_put((rows, last), gamma * last_values.to(token_rewards.dtype), accumulate=True)


def discounted_returns(
    token_rewards: Tensor,
    response_mask: Tensor,
    gamma: float,
    last_values: Optional[Tensor] = None,
) -> Tensor:
    """``G[i,t] = sum_{s>=t} gamma^(s-t) r[i,s] (+ gamma^(T_i-t) V_i)`` over real tokens.

    Args:
        token_rewards: ``(N, T)``, zero on padding.
        response_mask: ``(N, T)``, 1 on real tokens: a prefix of each row, or with holes (a
            multi-turn episode's observations), which are skipped: ``s`` and ``t`` then index
            the real tokens only.
        gamma: discount in [0, 1].
        last_values: ``(N,)`` bootstrap value of the state after the last real step (for
            sequences cut by a time limit), or ``None`` for terminal sequences.
    Returns:
        ``(N, T)`` returns, zero on padding.
    """
    mask = response_mask.to(token_rewards.dtype)
    r = _bootstrap(token_rewards * mask, response_mask, gamma, last_values)
    out = torch.empty_like(r)
    running = torch.zeros_like(r[:, 0])
    real = mask > 0
    for t in range(r.shape[1] - 1, -1, -1):
        # a masked-out position (padding, or an environment's tokens inside a multi-turn
        # episode) passes the return through unchanged: steps are counted on real tokens only
        running = torch.where(real[:, t], r[:, t] + gamma * running, running)
        out[:, t] = running
    return out * mask


def discounted_returns_loop(
    token_rewards: Tensor, response_mask: Tensor, gamma: float, last_values: Optional[Tensor] = None
) -> Tensor:
    """Reference form of :func:`discounted_returns`: the sum written out per element."""
    n, t_max = token_rewards.shape
    out = torch.zeros_like(token_rewards)
    for i in range(n):
        pos = [t for t in range(t_max) if response_mask[i, t] > 0]  # the real tokens, holes skipped
        length = len(pos)
        for a in range(length):
            g = sum(gamma ** (b - a) * float(token_rewards[i, pos[b]]) for b in range(a, length))
            if last_values is not None:
                g += gamma ** (length - a) * float(last_values[i])
            out[i, pos[a]] = g
    return out


def gae(
    token_rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float,
    lam: float,
    last_values: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2015, arXiv 1506.02438).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V_{T_i}`` = ``last_values`` or 0),
    ``A_t = sum_l (gamma lam)^l delta_{t+l}``, value targets ``returns = A + V``.

    Args:
        token_rewards, values, response_mask: ``(N, T)``; the mask may have holes (a
            multi-turn episode's observations): they are skipped, the next state of a real
            token is the next real token.
        last_values: ``(N,)`` value of the state after the last real step, or ``None``.
    Returns:
        ``(advantages, returns)``, each ``(N, T)``, zero on padding.
    """
    mask = response_mask.to(values.dtype)
    r = token_rewards * mask
    v = values * mask
    n, t_max = r.shape
    real = mask > 0
    # V after the last real token
    next_v = torch.zeros_like(v[:, 0]) if last_values is None else last_values.to(v.dtype)
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in range(t_max - 1, -1, -1):
        # masked-out positions (padding, a multi-turn episode's observations) are skipped:
        # the next state of a real token is the next real token
        delta = r[:, t] + gamma * next_v - v[:, t]
        running = torch.where(real[:, t], delta + gamma * lam * running, running)
        next_v = torch.where(real[:, t], v[:, t], next_v)
        adv[:, t] = running
    adv = adv * mask
    return adv, (adv + v) * mask


def gae_loop(
    token_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float,
    last_values: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Reference form of :func:`gae`: deltas, then the explicit weighted sum per element."""
    n, t_max = token_rewards.shape
    adv = torch.zeros_like(values)
    for i in range(n):
        pos = [t for t in range(t_max) if response_mask[i, t] > 0]  # the real tokens, holes skipped
        length = len(pos)
        v = [float(values[i, p]) for p in pos] + [0.0 if last_values is None else float(last_values[i])]
        deltas = [float(token_rewards[i, pos[a]]) + gamma * v[a + 1] - v[a] for a in range(length)]
        for a in range(length):
            adv[i, pos[a]] = sum((gamma * lam) ** j * deltas[a + j] for j in range(length - a))
    return adv, (adv + values) * response_mask.to(values.dtype)
