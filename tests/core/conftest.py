"""Shared helpers for the core tests.

``split_run`` runs one function on two halves of a batch in two threads whose ``reduce`` hooks
meet at a barrier and sum their partial sums: an in-process stand-in for a 2-rank all-reduce,
so "whole batch == two halves" can be checked without torch.distributed (the real gloo test is
in test_core_distributed.py).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
import torch


class TwoPartyAllReduce:
    """Sum-all-reduce between two threads. Every call of ``reducer(rank)`` blocks until the
    other rank has contributed its partial sums for the same reduction."""

    def __init__(self, timeout: float = 20.0) -> None:
        self.barrier = threading.Barrier(2, timeout=timeout)
        self.slots: list[Any] = [None, None]
        self.calls = [0, 0]

    def reducer(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(sums: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = sums.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]  # same order on both ranks
            self.barrier.wait()  # both have read before anyone overwrites a slot
            return total

        return reduce


def _split_run(fn: Callable[..., Any], args0: tuple, args1: tuple) -> tuple[Any, Any, list[int]]:
    """Run ``fn(*args0, reduce=r0)`` and ``fn(*args1, reduce=r1)`` concurrently; return both
    results and the number of reductions each side performed."""
    ar = TwoPartyAllReduce()
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def target(rank: int, args: tuple) -> None:
        try:
            results[rank] = fn(*args, reduce=ar.reducer(rank))
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)
            ar.barrier.abort()

    threads = [threading.Thread(target=target, args=(r, a)) for r, a in ((0, args0), (1, args1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise errors[0]
    return results[0], results[1], ar.calls


@pytest.fixture
def split_run() -> Callable[..., tuple[Any, Any, list[int]]]:
    return _split_run
