"""Calling a reward function in the TRL convention (keyword arguments: ``prompts``,
``completions`` and the dataset columns it names) and validating what it returns."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .base import RewardConfigError, RewardFn, function_name


def _accepted_arguments(fn: Callable[..., Any]) -> tuple[set[str] | None, set[str]]:
    """``(names, required)``: the keyword-passable parameter names of ``fn`` (``None`` when it
    takes ``**kwargs`` or cannot be inspected: pass everything) and those without a default."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, set()
    names: set[str] = set()
    required: set[str] = set()
    var_keyword = False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty:
            raise RewardConfigError(
                f"reward function {function_name(fn)} has positional-only parameter {p.name!r}; "
                "reward functions are called with keyword arguments (prompts=, completions=, columns)"
            )
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(p.name)
            if p.default is inspect.Parameter.empty:
                required.add(p.name)
    return (None if var_keyword else names), required


def reward_kwargs(
    fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> dict[str, Any]:
    """The keyword arguments of a TRL-convention call of ``fn``: ``prompts``, ``completions`` and
    the columns it accepts by name (all of them when it takes ``**kwargs`` or has no inspectable
    signature).

    Raises:
        RewardConfigError: a required parameter of ``fn`` is neither ``prompts``,
            ``completions`` nor a column of the batch.
    """
    available = {"prompts": prompts, "completions": completions, **columns}
    names, required = _accepted_arguments(fn)
    missing = sorted(required - available.keys())
    if missing:
        raise RewardConfigError(
            f"reward function {function_name(fn)} requires argument(s) {missing}, but the batch "
            f"provides only prompts, completions and the columns {sorted(columns)}"
        )
    return available if names is None else {k: v for k, v in available.items() if k in names}


def call_reward_function(
    fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> Sequence[Any]:
    """``fn(**reward_kwargs(fn, prompts, completions, columns))``, unvalidated."""
    return fn(**reward_kwargs(fn, prompts, completions, columns))


# --- output validation ------------------------------------------------------------------------


def as_list(out: Any) -> list[Any] | None:
    """A reward function's output as a Python list (tensor / ndarray / sequence); ``None`` when
    it is not a 1-D sequence."""
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu", torch.float64).tolist() if out.ndim == 1 else None
    if hasattr(out, "ndim") and hasattr(out, "tolist"):  # numpy array
        return out.tolist() if out.ndim == 1 else None
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        return None
    return list(out)


def as_float(value: Any) -> tuple[float | None, str | None]:
    """``(float, None)`` for a finite real number (bool, int, float, numpy / 0-d tensor scalar),
    ``(None, reason)`` otherwise."""
    if value is None:
        return None, "None"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None, f"a tensor of shape {tuple(value.shape)}"
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None, f"a {type(value).__name__} ({value!r:.40})"
    x = float(value)
    if math.isnan(x):
        return None, "NaN"
    if math.isinf(x):
        return None, "inf" if x > 0 else "-inf"
    return x, None


def describe_bad(bad: dict[int, str], limit: int = 8) -> str:
    items = sorted(bad.items())
    text = ", ".join(f"sample {i}: {reason}" for i, reason in items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items)} in all)"
    return text
