"""The types every reward module shares: the reward function signature, a named weighted
source, the scores of a batch, and the two errors (a failure on samples, a configuration error).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

RewardFn = Callable[..., Sequence[float]]
"""``fn(prompts=list[str], completions=list[str], **columns) -> Sequence[float]`` (TRL convention)."""

OnError = Literal["raise", "drop"]

RESERVED_ARGUMENTS = ("prompts", "completions")
"""Argument names the scorer fills itself; a dataset column may not use them."""


class RewardError(ValueError):
    """A reward source could not be loaded, or failed / returned bad values on a batch.

    Attributes:
        indices: sample indices (into the batch) that failed, when known; ``None`` when the
            failure concerns the whole call.
        values: partial per-sample results of a per-sample adapter (``None`` at the failed
            indices), so that drop mode need not call the function again; ``None`` otherwise.
    """

    def __init__(
        self,
        message: str,
        *,
        indices: Sequence[int] | None = None,
        values: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.indices = None if indices is None else tuple(indices)
        self.values = None if values is None else list(values)


class RewardConfigError(RewardError):
    """A configuration error rather than a failure on some samples (a required argument that no
    column provides, a column named ``prompts``): raised in both ``on_error`` modes and never
    retried per sample. Reward functions may raise it too (the verl adapter does when the
    ground-truth column is missing)."""


@dataclass
class RewardSource:
    """One named, weighted reward function.

    Attributes:
        name: name in logs and error messages (``reward/<name>``); made unique by
            :class:`RewardScorer` (``acc``, ``acc_2``, ...).
        fn: the reward function, TRL convention (module docstring).
        weight: ``w_s`` in ``rewards = sum_s w_s * r_s``.
    """

    name: str
    fn: RewardFn
    weight: float = 1.0


@dataclass
class RewardResult:
    """The scores of one batch of ``N`` completions.

    Attributes:
        rewards: ``(N,)`` float32, ``sum_s weight_s * r_s``; exactly 0 where ``dropped``.
        per_source: name -> ``(N,)`` float32 unweighted ``r_s``; 0 where that source failed.
        dropped: ``(N,)`` bool, samples on which any source failed (``on_error="drop"`` only;
            all False in raise mode). The trainer must mask them out of the loss.
        dropped_per_source: name -> number of samples that source failed on in this batch.
    """

    rewards: torch.Tensor
    per_source: dict[str, torch.Tensor]
    dropped: torch.Tensor
    dropped_per_source: dict[str, int] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        """Number of dropped samples in the batch."""
        return int(self.dropped.sum().item())


def function_name(fn: Any) -> str:
    """``module.qualname`` of a function, the description of an adapter, or the class name of a
    callable object."""
    display = getattr(fn, "display_name", None)
    if isinstance(display, str):
        return display
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def short_name(fn: Any, default: str) -> str:
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name and name != "<lambda>":
        return name
    return default
