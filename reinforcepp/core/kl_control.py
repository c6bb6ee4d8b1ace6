"""KL coefficient controllers (beta)."""

from __future__ import annotations

from dataclasses import dataclass


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
