"""Wall time per phase of a step (generate, score, forward, update, eval, save), logged as ``time/*``."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Iterator


class PhaseTimer:
    """Adds up the seconds spent in each named phase until :meth:`pop`."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.clock = clock
        self._open: list[str] = []
        self._since = 0.0

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time ``phase``; a phase opened inside another pauses the outer one, so each
        second is counted once (the update's forward run early counts as update, not forward)."""
        now = self.clock()
        if self._open:
            self.totals[self._open[-1]] += now - self._since
        self._open.append(phase)
        self._since = now
        try:
            yield
        finally:
            now = self.clock()
            self.totals[self._open.pop()] += now - self._since
            self._since = now

    def pop(self) -> dict[str, float]:
        """``{"time/<phase>": seconds}`` since the last pop, and start again."""
        out = {f"time/{k}": v for k, v in self.totals.items()}
        self.totals.clear()
        return out
