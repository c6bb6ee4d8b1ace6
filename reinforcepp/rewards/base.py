"""The types every reward module shares: the reward function signature, a named weighted
source, the scores of a batch, and the two errors (a failure on samples, a configuration error).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import InputError

RewardFn = Callable[..., Sequence[float]]
"""``fn(prompts=list[str], completions=list[str], **columns) -> Sequence[float]`` (TRL convention)."""

OnError = Literal["raise", "drop"]

RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")
"""Argument names the scorer fills itself (as TRL does); a dataset column may not use them."""


class RewardError(InputError, ValueError):
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


class RewardTimeoutError(RewardError):
    """A reward call did not return within ``reward_timeout`` seconds. Raised in both
    ``on_error`` modes: a source that hangs once would hang on every retry."""


class RewardExitError(RewardError):
    """A reward call tried to end the process (``sys.exit``, ``os._exit``): reported naming the
    source and the call, raised in both ``on_error`` modes and never retried. The run stops
    there, its last checkpoint intact (see ``reinforcepp.rewards.calling`` for what can and
    cannot be caught in-process)."""


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


@dataclass(frozen=True)
class TrainerState:
    """What a reward function taking ``trainer_state`` receives (TRL passes its ``TrainerState``;
    the fields a reward reads, such as ``global_step`` for a curriculum, have the same names).

    Attributes:
        global_step: RL steps completed before this one (0 on the first step).
        max_steps: the run's ``total_steps``.
        epoch: ``global_step / max_steps``, as a float (TRL counts epochs over the data; here one
            "epoch" is the whole run).
    """

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


@dataclass
class RewardResult:
    """The scores of one batch of ``N`` completions.

    Attributes:
        rewards: ``(N,)`` float32, ``sum_s weight_s * r_s``; exactly 0 where ``dropped``.
        per_source: name -> ``(N,)`` float32 unweighted ``r_s``; 0 where that source failed,
            NaN where it returned ``None`` (did not score the sample; log with ``nanmean``).
        dropped: ``(N,)`` bool, samples on which any source failed (``on_error="drop"`` only)
            or that no source scored (every source returned ``None``). The trainer must mask
            them out of the loss.
        dropped_per_source: name -> number of samples that source failed on in this batch.
        unscored: ``(N,)`` bool, samples that no source scored (a subset of ``dropped``).
        extras: ``"<source>/<key>"`` -> mean over the batch of an extra metric a source
            reported (verl's dict keys besides ``score``, OpenRLHF's ``extra_logs``), logged as
            ``reward/<source>/<key>``.
        token_rewards: name -> per sample, ``None`` or one unweighted reward per completion
            token, for the process-reward sources (those that return a list per sample).
    """

    rewards: torch.Tensor
    per_source: dict[str, torch.Tensor]
    dropped: torch.Tensor
    dropped_per_source: dict[str, int] = field(default_factory=dict)
    unscored: torch.Tensor | None = None
    extras: dict[str, float] = field(default_factory=dict)
    token_rewards: dict[str, list[list[float] | None]] = field(default_factory=dict)

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
