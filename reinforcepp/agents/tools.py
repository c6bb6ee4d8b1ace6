"""Tool calling: parse a call from the model's turn, run the registered Python function with a
per-call timeout, return its output (or its error text) as the next observation.

Two call formats ship:

* :class:`TagToolParser` (plain tags, for models without a tool-call chat format such as the
  built-in tiny model): ``<tool>NAME ARG ARG ...</tool>`` or ``<tool>NAME {"a": 1}</tool>``;
* :class:`JSONToolParser` (the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` format
  that the chat templates of Qwen2.5/Qwen3, Hermes and others render and are trained on).

A turn without a call is the final answer: the episode ends and ``reward_fn(row, answer)``
scores it (0 when no ``reward_fn``; the trainer's reward functions score the final answer too).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .protocol import Prompt


@dataclass(frozen=True)
class ToolCall:
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None


class ToolCallError(ValueError):
    """The turn holds a tool call that cannot be read (bad JSON, no name)."""


class ToolParser(Protocol):
    def parse(self, text: str) -> ToolCall | None:
        """The first tool call in ``text``; ``None`` when there is none (a final answer)."""
        ...

    def format_result(self, output: str) -> str:
        """The observation text for a tool's output."""
        ...


class TagToolParser:
    """``<tool>NAME ARGS</tool>``: ARGS is a JSON object (keyword arguments) or
    whitespace-separated words (positional arguments, converted to the tool's annotated
    ``int`` / ``float`` / ``bool`` types). The output comes back as ``<result>OUTPUT</result>``."""

    def __init__(
        self, open: str = "<tool>", close: str = "</tool>", result_open: str = "<result>",
        result_close: str = "</result>",
    ) -> None:
        self.open, self.close, self.result_open, self.result_close = open, close, result_open, result_close

    def parse(self, text: str) -> ToolCall | None:
        start = text.find(self.open)
        if start < 0:
            return None
        end = text.find(self.close, start + len(self.open))
        body = text[start + len(self.open) : end if end >= 0 else len(text)].strip()
        if not body:
            raise ToolCallError("empty tool call")
        name, _, rest = body.partition(" ")
        rest = rest.strip()
        if rest.startswith("{"):
            kwargs = _loads(rest, "arguments are")
            if not isinstance(kwargs, dict):
                raise ToolCallError("arguments must be a JSON object")
            return ToolCall(name, (), kwargs)
        return ToolCall(name, tuple(rest.split()))

    def format_result(self, output: str) -> str:
        return f"{self.result_open}{output}{self.result_close}"


def _loads(text: str, what: str) -> Any:
    """``json.loads``, a failure being a :class:`ToolCallError` ("WHAT not valid JSON: ...")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"{what} not valid JSON: {e.msg}") from None


class JSONToolParser:
    """``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`` (Hermes / Qwen chat
    templates). The output goes back unwrapped: the chat template renders it as a ``tool``
    message."""

    pattern = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ToolCall | None:
        m = self.pattern.search(text)
        if m is None:
            return None
        call = _loads(m.group(1), "the tool call is")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ToolCallError('a tool call needs {"name": ..., "arguments": {...}}')
        arguments = call.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = _loads(arguments, "the arguments are")
        if not isinstance(arguments, dict):
            raise ToolCallError("arguments must be a JSON object")
        return ToolCall(call["name"], (), arguments)

    def format_result(self, output: str) -> str:
        return output


def _coerce(fn: Callable[..., Any], args: Sequence[Any]) -> list[Any]:
    """Positional string arguments converted to the annotated ``int``/``float``/``bool`` types."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return list(args)
    out = []
    for i, a in enumerate(args):
        tp = params[i].annotation if i < len(params) else inspect.Parameter.empty
        if isinstance(a, str) and tp in (int, float, "int", "float"):
            a = (int if tp in (int, "int") else float)(a)
        elif isinstance(a, str) and tp in (bool, "bool"):
            a = a.lower() in ("1", "true", "yes")
        out.append(a)
    return out


def _call_with_timeout(
    fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], timeout: float
) -> concurrent.futures.Future[Any]:
    """Run ``fn`` on a daemon thread; the future holds its result or exception. A call that
    never returns leaves its thread behind (Python cannot kill a thread) but never blocks the
    run or its exit."""
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def target() -> None:
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - the error text goes back to the model
            fut.set_exception(e)

    threading.Thread(target=target, daemon=True, name=f"tool-{getattr(fn, '__name__', 'call')}").start()
    return fut


class ToolEnv:
    """A tool-using environment: every model turn with a tool call runs the tool and returns
    its output; a turn without one is the final answer.

    Args:
        tools: functions, or a ``{name: function}`` dict (sync or ``async``). Their return
            value is turned into text with ``str``.
        parser: the call format (default :class:`TagToolParser`).
        timeout: seconds a call may run; after that the model sees ``error: timed out``.
        reward_fn: ``reward_fn(row, final_answer) -> float``, the reward at the end of the
            episode (default 0: the trainer's reward functions score the final answer).
        prompt_fn: ``prompt_fn(row) -> str | messages``, the episode's first prompt (default:
            the row's prompt).

    ``step`` returns ``info`` with ``tool_calls``, ``tool_errors`` (the tool raised, an
    unknown tool, unreadable arguments) and ``tool_timeouts`` (1 or 0 for the turn).
    """

    def __init__(
        self,
        tools: Sequence[Callable[..., Any]] | dict[str, Callable[..., Any]],
        *,
        parser: ToolParser | None = None,
        timeout: float = 10.0,
        reward_fn: Callable[[dict[str, Any], str], float] | None = None,
        prompt_fn: Callable[[dict[str, Any]], Prompt] | None = None,
    ) -> None:
        self.tools = dict(tools) if isinstance(tools, dict) else {t.__name__: t for t in tools}
        self.parser: ToolParser = parser or TagToolParser()
        self.timeout = timeout
        self.reward_fn = reward_fn
        self.prompt_fn = prompt_fn
        self.row: dict[str, Any] = {}

    def reset(self, row: dict[str, Any]) -> Prompt | None:
        self.row = row
        return self.prompt_fn(row) if self.prompt_fn is not None else None

    async def step(self, assistant_text: str) -> tuple[str, float, bool, dict[str, float]]:
        try:
            call = self.parser.parse(assistant_text)
        except ToolCallError as e:
            return self._error(f"bad tool call: {e}")
        if call is None:
            reward = float(self.reward_fn(self.row, assistant_text)) if self.reward_fn is not None else 0.0
            return "", reward, True, {"tool_calls": 0.0, "tool_errors": 0.0, "tool_timeouts": 0.0}
        fn = self.tools.get(call.name)
        if fn is None:
            return self._error(f"unknown tool {call.name!r}; tools: {', '.join(self.tools)}")
        try:
            args = _coerce(fn, call.args)
        except ValueError as e:
            return self._error(f"bad arguments for {call.name}: {e}")
        if inspect.iscoroutinefunction(fn):
            coro = fn(*args, **(call.kwargs or {}))
        else:
            coro = asyncio.wrap_future(_call_with_timeout(fn, args, call.kwargs or {}, self.timeout))
        try:
            output = await asyncio.wait_for(coro, self.timeout)
        except asyncio.TimeoutError:
            return self._error(f"{call.name} timed out after {self.timeout:g} s", timeout=True)
        except Exception as e:  # noqa: BLE001 - the model sees the error and the run goes on
            return self._error(f"{call.name} raised {type(e).__name__}: {e}")
        info = {"tool_calls": 1.0, "tool_errors": 0.0, "tool_timeouts": 0.0}
        return self.parser.format_result(str(output)), 0.0, False, info

    def _error(self, text: str, timeout: bool = False) -> tuple[str, float, bool, dict[str, float]]:
        info = {"tool_calls": 1.0, "tool_errors": 0.0 if timeout else 1.0, "tool_timeouts": 1.0 if timeout else 0.0}
        return self.parser.format_result(f"error: {text}"), 0.0, False, info
