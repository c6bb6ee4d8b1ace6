"""The non-finite guard of both trainers: a NaN or inf never reaches the weights.

Each optimizer step asks :meth:`NonFiniteGuard.check` before ``optimizer.step()``. A step whose
loss or gradient norm is not finite is skipped (the caller drops its gradients) and counted
(``nonfinite/skipped_steps``); ``max_in_a_row`` skipped steps in a row stop the run with
:class:`~reinforcepp.errors.NonFiniteError`, naming where, the values and what to try.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import NonFiniteError


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
            raise NonFiniteError(
                f"{where}: {self.in_a_row} optimizer steps in a row had a non-finite loss ({loss}) or gradient norm "
                f"({grad_norm}); the weights were left untouched. {self.hint}"
            )
        return False
