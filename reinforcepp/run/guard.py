"""The guards of both trainers: a NaN or inf never reaches the weights, and a run that diverges
while staying finite is stopped.

Each optimizer step asks :meth:`NonFiniteGuard.check` before ``optimizer.step()``. A step whose
loss or gradient norm is not finite is skipped (the caller drops its gradients) and counted
(``nonfinite/skipped_steps``); ``max_in_a_row`` skipped steps in a row stop the run with
:class:`~reinforcepp.errors.NonFiniteError`, naming where, the value that was not finite and
what to try.

Divergence need not be non-finite: at ``lr=1e30`` a CartPole policy's weights reach 1e30 while
every loss and gradient stays finite. :class:`DivergenceGuard` measures the global L2 norm of the
trained weights after each update, ``||theta_t||``, and stops the run
(:class:`~reinforcepp.errors.DivergenceError`) when it exceeds ``max_growth`` times its value at
the start of the run, ``||theta_0||`` (saved in checkpoints, so a resumed run keeps the same
bound). The stop comes before the next checkpoint, so the last checkpoint holds the weights
before the divergence.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from ..errors import DivergenceError, NonFiniteError


class NonFiniteGuard:
    """Counts skipped optimizer steps; ``total`` is saved in checkpoints.

    Args:
        max_in_a_row: this many non-finite steps in a row raise :class:`NonFiniteError`.
        hint: what to try, appended to the error (e.g. ``"Lower lr, check the rewards."``).
    """

    def __init__(self, max_in_a_row: int, hint: str) -> None:
        self.max_in_a_row = max_in_a_row
        self.hint = hint
        self.in_a_row = 0
        self.total = 0

    def check(self, loss: Any, grad_norm: Any, where: str, *, reset: bool = True) -> bool:
        """True when ``loss`` and ``grad_norm`` (floats or 0-d tensors) are both finite: the step
        may go ahead. Otherwise the skip is counted and False returned, or, the
        ``max_in_a_row``-th time in a row, :class:`NonFiniteError` is raised (``where``: the
        step, e.g. ``"step 12"``). ``reset=False``: a finite step does not end the run of
        non-finite ones (a secondary optimizer, e.g. a critic's, beside the policy's step)."""
        loss, grad_norm = (float(x.detach()) if hasattr(x, "detach") else float(x) for x in (loss, grad_norm))
        if math.isfinite(loss) and math.isfinite(grad_norm):
            if reset:
                self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_in_a_row:
            values = (("loss", loss), ("gradient norm", grad_norm))
            bad = [f"{name} {value}" for name, value in values if not math.isfinite(value)]
            fine = [f"{name} {value:.3g}" for name, value in values if math.isfinite(value)]
            raise NonFiniteError(
                f"{where}: {self.in_a_row} optimizer steps in a row were not finite (this one: {' and '.join(bad)}"
                f"{'; ' + fine[0] if fine else ''}); the weights were left untouched. {self.hint}"
            )
        return False


def weight_norm(params: Iterable[torch.Tensor]) -> float:
    """The global L2 norm of ``params`` together (sharded DTensors: over every shard), as a float;
    ``inf`` when it overflows float32."""
    tensors = [p.detach() for p in params]
    if not tensors:
        return 0.0
    norm = torch.nn.utils.get_total_norm(tensors, 2.0)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


class DivergenceGuard:
    """Stops a run whose weights grow without bound while staying finite (module docstring).

    Args:
        max_growth: the bound on ``||theta_t|| / ||theta_0||``; None = off.
        params: the trained parameters; their norm now is ``||theta_0||`` (a resumed run sets
            :attr:`start` back to the saved one).
        hint: what to try, appended to the error.
    """

    def __init__(self, max_growth: Optional[float], params: Iterable[torch.Tensor], hint: str) -> None:
        self.max_growth = max_growth
        self.hint = hint
        self.start = weight_norm(params)

    def check(self, params: Iterable[torch.Tensor], where: str) -> float:
        """The weight norm now (logged as ``weight_norm``); :class:`DivergenceError` when it is
        beyond ``max_growth * start`` or not finite (``where``: the step)."""
        norm = weight_norm(params)
        if self.max_growth is not None and not norm <= self.max_growth * max(self.start, 1e-12):
            grew = (f"to {norm:.4g} (x{norm / max(self.start, 1e-12):.3g} > max_weight_growth={self.max_growth:g})"
                    if math.isfinite(norm) else "beyond float32's range (its square overflows)")
            raise DivergenceError(
                f"{where}: training diverged: the policy's weight norm grew from {self.start:.4g} {grew}, while every "
                "loss and gradient the non-finite guard saw was finite; the run stopped before saving these weights "
                f"(a checkpoint written before is intact). {self.hint}"
            )
        return norm
