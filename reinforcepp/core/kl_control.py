"""KL coefficient controllers (beta)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FixedKLController:
    """``beta`` stays constant."""

    value: float

    def update(self, current_kl: float, n_samples: int) -> float:
        """Return beta, unchanged."""
        return self.value


@dataclass
class AdaptiveKLController:
    """Adaptive KL controller (Ziegler et al. 2019, arXiv 1909.08593, section 2.2):

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n / horizon)`` with
    ``n`` the number of responses in the batch. ``KL`` is the observed mean per-sequence KL.
    """

    value: float
    target: float
    horizon: int

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {self.target}, {self.horizon}")

    def update(self, current_kl: float, n_samples: int) -> float:
        """One controller step after a batch of ``n_samples`` responses whose mean
        per-sequence KL was ``current_kl``; returns the new beta."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


@torch.no_grad()
def mix_reference(ref_params: Iterable[Tensor], policy_params: Iterable[Tensor], alpha: float = 1.0) -> None:
    """Reference refresh (TRL's ``sync_ref_model``, TR-DPO arXiv 2404.09656), in place:
    ``theta_ref <- alpha * theta + (1 - alpha) * theta_ref`` for each parameter pair.
    ``alpha = 1`` copies the policy (a hard reset of the KL anchor); TRL's default mixup is 0.6.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    ref, pol = list(ref_params), list(policy_params)
    if len(ref) != len(pol):
        raise ValueError(f"the reference has {len(ref)} parameters, the policy {len(pol)}")
    for r, p in zip(ref, pol):
        if r.shape != p.shape:
            raise ValueError(f"parameter shapes differ: {tuple(r.shape)} vs {tuple(p.shape)}")
        r.lerp_(p.to(r.dtype), alpha)
