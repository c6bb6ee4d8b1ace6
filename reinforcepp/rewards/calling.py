"""Calling a reward function in the TRL convention and validating what it returns.

A reward function is called with keyword arguments: ``prompts``, ``completions``, optionally
``completion_ids`` and ``trainer_state``, and the dataset columns it names (all of them when it
takes ``**kwargs``). When the prompts were conversational (lists of chat messages), ``prompts``
are those message lists and each completion is ``[{"role": "assistant", "content": text}]``, as
in TRL; sources that read plain text (the verl / OpenRLHF adapters, reward models, reward
servers: ``text_only = True``) always get the rendered strings.

Every call runs in its own daemon thread (``async def`` functions in an event loop of their
own), so the scorer can run the sources concurrently and give up on one after ``timeout``
seconds without waiting for it.

A reward function runs in the trainer's process, so one that ends the process would end the
run without a word. Within a reward call, ``sys.exit`` (a ``SystemExit``) and ``os._exit``
(replaced, once, by a function that raises inside reward calls of this process and is the real
``os._exit`` everywhere else, forked children included) become a
:class:`~reinforcepp.rewards.base.RewardExitError` naming the source and the call. What cannot be
caught in-process is not: a function that took ``os._exit`` before the first reward call
(``from os import _exit``), ``os.abort()``, a signal, a crash in native code. A reward you do not
trust runs safer in another process: ``reinforcepp serve reward`` and ``reward_funcs=http://...``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from .base import (
    RESERVED_ARGUMENTS,
    RewardConfigError,
    RewardExitError,
    RewardFn,
    RewardTimeoutError,
    TrainerState,
    function_name,
)

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

logger = logging.getLogger(__name__)


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


def check_columns(fn: RewardFn, columns: Sequence[str], where: str) -> None:
    """Before any step: every required argument of ``fn`` is a column (or one the scorer fills).

    Adapters that read a column under several names check themselves (``check_columns``
    method). Raises :class:`RewardConfigError` naming the reward, the argument and the columns.
    """
    own = getattr(fn, "check_columns", None)
    if callable(own):
        own(list(columns), where)
        return
    _, required = _accepted_arguments(fn)
    missing = sorted(required - set(RESERVED_ARGUMENTS) - set(columns))
    if missing:
        raise RewardConfigError(
            f"{where} needs argument {missing[0]!r}, which is not a column of the dataset "
            f"(columns: {', '.join(sorted(columns)) or 'none besides the prompt'})"
        )


@dataclass
class RewardBatch:
    """What the reward sources of one call see; every list is aligned with ``completions``.

    Attributes:
        prompts: ``N`` rendered prompt strings.
        completions: ``N`` completion strings.
        columns: extra dataset columns, each ``N`` values.
        completion_ids: ``N`` token-id lists of the completions, or ``None``.
        trainer_state: passed to functions that take ``trainer_state``, or ``None``.
        chat_prompts: ``N`` conversational prompts (lists of messages), or ``None`` when the
            prompts were plain text.
    """

    prompts: list[Any]
    completions: list[str]
    columns: dict[str, list]
    completion_ids: list[list[int]] | None = None
    trainer_state: TrainerState | None = None
    chat_prompts: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.completions)

    def sample(self, i: int) -> RewardBatch:
        """The batch of sample ``i`` alone."""
        return RewardBatch(
            [self.prompts[i]],
            [self.completions[i]],
            {k: [v[i]] for k, v in self.columns.items()},
            None if self.completion_ids is None else [self.completion_ids[i]],
            self.trainer_state,
            None if self.chat_prompts is None else [self.chat_prompts[i]],
        )

    def kwargs_for(self, fn: RewardFn) -> dict[str, Any]:
        """The keyword arguments of ``fn``'s call (see the module docstring).

        Raises:
            RewardConfigError: a required parameter of ``fn`` is neither a name the scorer fills
                nor a column of the batch.
        """
        text_only = getattr(fn, "text_only", False)
        if self.chat_prompts is not None and not text_only:
            available: dict[str, Any] = {
                "prompts": self.chat_prompts,
                "completions": [[{"role": "assistant", "content": c}] for c in self.completions],
            }
        else:
            available = {"prompts": self.prompts, "completions": self.completions}
        if self.completion_ids is not None and not text_only:
            available["completion_ids"] = self.completion_ids
        if self.trainer_state is not None and not text_only:
            available["trainer_state"] = self.trainer_state
        available.update(self.columns)
        names, required = _accepted_arguments(fn)
        missing = sorted(required - available.keys())
        if missing:
            raise RewardConfigError(
                f"reward function {function_name(fn)} requires argument(s) {missing}, but the batch "
                f"provides only {', '.join(k for k in available if k not in self.columns)} "
                f"and the columns {sorted(self.columns)}"
            )
        return available if names is None else {k: v for k, v in available.items() if k in names}


def reward_kwargs(
    fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> dict[str, Any]:
    """The keyword arguments of a TRL-convention call of ``fn`` on plain-text prompts:
    ``prompts``, ``completions`` and the columns it accepts by name (all of them when it takes
    ``**kwargs`` or has no inspectable signature). See :meth:`RewardBatch.kwargs_for`."""
    return RewardBatch(prompts, completions, columns).kwargs_for(fn)


def call_reward_function(
    fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> Any:
    """``fn(**reward_kwargs(fn, prompts, completions, columns))``, unvalidated, in this thread
    (a coroutine is run to completion)."""
    try:
        return _run(fn, reward_kwargs(fn, prompts, completions, columns))
    except ExitAttempt as exc:
        raise exited(f"reward function {function_name(fn)}", exc) from None


class ExitAttempt(BaseException):
    """A reward call tried to end the process: ``call`` says how (``sys.exit(3)``, ``os._exit(0)``)."""

    def __init__(self, call: str) -> None:
        super().__init__(call)
        self.call = call


def exited(where: str, attempt: ExitAttempt) -> RewardExitError:
    return RewardExitError(f"{where} called {attempt.call} while scoring: a reward function must return its scores, "
                           "not end the process; the run stopped here")


_IN_REWARD = threading.local()
_EXIT_GUARD_LOCK = threading.Lock()
_EXIT_GUARDED: list[bool] = []


def _depth() -> int:
    """Reward calls this thread is inside (0: none)."""
    depth: int = getattr(_IN_REWARD, "depth", 0)
    return depth


def _guard_os_exit() -> None:
    """Replace ``os._exit``, once, by a function that raises :class:`ExitAttempt` when called
    inside a reward call of this process (this thread's ``_IN_REWARD.depth`` > 0) and calls the
    real ``os._exit`` otherwise: in other code, other threads, forked children."""
    with _EXIT_GUARD_LOCK:
        if _EXIT_GUARDED:
            return
        real_exit, pid = os._exit, os.getpid()

        def guarded_exit(status: int) -> NoReturn:
            if os.getpid() == pid and _depth() > 0:
                raise ExitAttempt(f"os._exit({status!r})")
            real_exit(status)

        os._exit = guarded_exit
        _EXIT_GUARDED.append(True)


def _run(fn: RewardFn, kwargs: dict[str, Any]) -> Any:
    """``fn(**kwargs)`` (a coroutine run to completion); ``sys.exit`` and ``os._exit`` inside
    it raise :class:`ExitAttempt` instead of ending the process."""
    _guard_os_exit()
    _IN_REWARD.depth = _depth() + 1
    try:
        out: Any = fn(**kwargs)
        if inspect.isawaitable(out):  # async def: TRL runs these in an event loop

            async def wait() -> Any:
                return await out

            out = asyncio.run(wait())
        return out
    except SystemExit as exc:
        raise ExitAttempt(f"sys.exit({exc.code!r})") from None
    finally:
        _IN_REWARD.depth -= 1


_MAIN_THREAD_ONLY: set[int] = set()
"""``id`` of the reward functions that failed in a worker thread because they install a signal
handler (``signal.alarm`` timeouts, as math-verify's ``parse``/``verify`` use): called in the
calling thread from then on, unbounded by ``timeout``."""


def _needs_main_thread(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and "signal only works in main thread" in str(exc)


class PendingCall:
    """One reward call started in a daemon thread: ``result()`` waits for it, at most until
    ``timeout`` seconds after the start, and re-raises what the function raised. A call that
    never returns is left behind in its daemon thread (it cannot stop the process exiting).

    A function that can only run in the main thread (it sets a signal handler) is called again
    in the calling thread, with a warning, and there from then on: signals cannot be bounded by
    ``timeout`` nor run concurrently."""

    def __init__(self, fn: RewardFn, kwargs: dict[str, Any], timeout: float | None, where: str) -> None:
        self.timeout = timeout
        self.where = where
        self.fn, self.kwargs = fn, kwargs
        self._box: dict[str, Any] = {}
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        if id(fn) not in _MAIN_THREAD_ONLY:
            self._thread = threading.Thread(target=self._target, args=(fn, kwargs), daemon=True, name=f"reward {where}")
            self._thread.start()

    def _target(self, fn: RewardFn, kwargs: dict[str, Any]) -> None:
        try:
            self._box["out"] = _run(fn, kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self._box["exc"] = exc

    def result(self) -> Any:
        try:
            return self._result()
        except ExitAttempt as exc:
            raise exited(self.where, exc) from None

    def _result(self) -> Any:
        if self._thread is None:
            return _run(self.fn, self.kwargs)
        left = None if self.timeout is None else max(0.0, self._started + self.timeout - time.monotonic())
        self._thread.join(left)
        if self._thread.is_alive():
            raise RewardTimeoutError(
                f"{self.where} did not return within reward_timeout={self.timeout:g} s; "
                "raise reward_timeout or make the reward faster"
            )
        if "exc" in self._box:
            if _needs_main_thread(self._box["exc"]) and threading.current_thread() is threading.main_thread():
                logger.warning("%s sets a signal handler, which works only in the main thread: it is called there, "
                               "one call at a time and not bounded by reward_timeout", self.where)
                _MAIN_THREAD_ONLY.add(id(self.fn))
                return _run(self.fn, self.kwargs)
            raise self._box["exc"]
        return self._box["out"]


def call_bounded(fn: RewardFn, batch: RewardBatch, timeout: float | None, where: str) -> Any:
    """``fn`` called on ``batch``, bounded by ``timeout`` (:class:`PendingCall`)."""
    return PendingCall(fn, batch.kwargs_for(fn), timeout, where).result()


# --- output validation ------------------------------------------------------------------------


def split_output(out: Any) -> tuple[Any, dict[str, Any]]:
    """``(rewards, extra_logs)`` of a reward function's output: a dict ``{"rewards": [...],
    "extra_logs": {key: values}}`` (OpenRLHF's form; the verl adapter returns it too) or the
    rewards alone."""
    if isinstance(out, dict) and "rewards" in out:
        extra = out.get("extra_logs") or {}
        return out["rewards"], dict(extra) if isinstance(extra, dict) else {}
    return out, {}


def as_list(out: Any) -> list[Any] | None:
    """A reward function's output as a Python list (tensor / ndarray / sequence); ``None`` when
    it is not a sequence of per-sample values."""
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu", torch.float64).tolist() if out.ndim in (1, 2) else None
    if hasattr(out, "ndim") and hasattr(out, "tolist"):  # numpy array
        return out.tolist() if out.ndim in (1, 2) else None
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        return None
    return list(out)


def as_float(value: Any) -> tuple[float | None, str | None]:
    """``(float, None)`` for a finite real number within float32 range (bool, int, float,
    numpy / 0-d tensor scalar); ``(None, None)`` for ``None`` (the source does not score this
    sample, TRL's convention); ``(None, reason)`` otherwise."""
    if value is None:
        return None, None
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
    if abs(x) > FLOAT32_MAX:
        return None, f"{x:g}, beyond the float32 range"
    return x, None


def as_value(value: Any) -> tuple[float | list[float] | None, str | None]:
    """One sample's reward: a number (:func:`as_float`), ``None``, or a list of numbers (a
    process reward: one per token, or one per step), each checked like a number."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "ndim") and getattr(value, "ndim", 0) == 1):
        items = value.tolist() if hasattr(value, "tolist") else list(value)
        out: list[float] = []
        for j, item in enumerate(items):
            x, reason = as_float(item)
            if x is None:
                return None, f"element {j} of its list is {reason or 'None'}"
            out.append(x)
        return out, None
    return as_float(value)


def describe_bad(bad: dict[int, str], limit: int = 8) -> str:
    items = sorted(bad.items())
    text = ", ".join(f"sample {i}: {reason}" for i, reason in items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items)} in all)"
    return text
