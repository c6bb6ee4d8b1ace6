"""The environment protocol for language models: multi-turn episodes on the same trainer.

An environment plays the other side of a conversation with the policy::

    prompt = env.reset(row)                    # str or chat messages; None = the row's prompt
    obs, reward, done = env.step(assistant_text)   # (optionally a 4th item: info, a dict of numbers)

``reset`` and ``step`` may be plain or ``async`` methods. A fresh environment is made for every
episode (``factory()``), so an environment may keep per-episode state. The trainer tokenises
the whole transcript as one sequence ``[prompt | turn 1 | observation 1 | turn 2 | ...]`` and
trains only the model's own tokens (``response_mask`` is 0 on observations); see docs/agents.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import InputError

Prompt = str | list[dict[str, Any]]


class EnvError(InputError, ValueError):
    """An environment broke the protocol (non-string observation, non-finite reward, ...).
    The message is one line naming the environment and the turn (the command line prints it
    and exits with code 2)."""


@runtime_checkable
class Environment(Protocol):
    """What the trainer calls. ``step`` returns ``(observation, reward, done)`` or
    ``(observation, reward, done, info)``; ``info`` maps names to numbers, summed per episode
    and logged as ``env/<name>``."""

    def reset(self, row: dict[str, Any]) -> Prompt | None: ...

    def step(self, assistant_text: str) -> tuple: ...


EnvFactory = Callable[[], Environment]


@dataclass
class StepResult:
    """A validated ``step`` output."""

    observation: str
    reward: float
    done: bool
    info: dict[str, float] = field(default_factory=dict)


def env_name(env: Any) -> str:
    return type(env).__name__


def check_step(env: Any, turn: int, out: Any) -> StepResult:
    """Validate what ``env.step`` returned on ``turn`` (1-based); :class:`EnvError` otherwise."""
    where = f"environment {env_name(env)}, turn {turn}"
    if not isinstance(out, tuple) or len(out) not in (3, 4):
        raise EnvError(f"{where}: step() must return (observation, reward, done[, info]), "
                       f"got {type(out).__name__} {str(out)[:60]!r}")
    obs, reward, done = out[:3]
    info = out[3] if len(out) == 4 else {}
    if not isinstance(obs, str):
        raise EnvError(f"{where}: the observation is a {type(obs).__name__}, expected str")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(float(reward)):
        raise EnvError(f"{where}: the reward is {reward!r}, expected a finite number")
    if not isinstance(info, dict) or not all(
        isinstance(v, (int, float)) and math.isfinite(float(v)) for v in info.values()
    ):
        raise EnvError(f"{where}: info must be a dict of finite numbers, got {str(info)[:60]!r}")
    return StepResult(obs, float(reward), bool(done), {str(k): float(v) for k, v in info.items()})


def check_prompt(env: Any, prompt: Any, row: dict[str, Any], prompt_column: str) -> Prompt:
    """The prompt ``reset`` returned (``None`` = the row's own prompt), checked."""
    if prompt is None:
        prompt = row[prompt_column]
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)
    ):
        return prompt
    raise EnvError(f"environment {env_name(env)}, reset: returned a {type(prompt).__name__}, "
                   "expected a str, chat messages or None")


def load_environment(spec: str) -> EnvFactory:
    """``module:attr`` or ``path/file.py:attr`` -> the environment factory it names (a class or a
    function called with no argument for each episode)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise EnvError(f"environment spec {spec!r}: expected module:factory or path/file.py:factory")
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise EnvError(f"environment spec {spec!r}: file {target!r} not found")
        module_name = f"reinforcepp_env_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise EnvError(f"environment spec {spec!r}: module {target!r} is not importable ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise EnvError(f"environment spec {spec!r}: {target} has no callable {attr!r}")
    return factory
