"""Multi-turn, tool-using rollouts for language models (text environments on the same trainer).

See docs/agents.md. The pieces:

* :mod:`.protocol`: the environment protocol (``reset(row)``, ``step(text)``), validation;
* :mod:`.tools`: :class:`ToolEnv` with tool-call parsers and per-call timeouts;
* :mod:`.rollout`: :class:`EpisodeRunner`, which plays episodes through any generation engine;
* :mod:`.task`: the built-in ``task=tools`` (a calculator for 4-digit additions).
"""

from .protocol import EnvError, EnvFactory, Environment, StepResult, load_environment
from .rollout import (
    ChatFormat,
    EpisodeInfo,
    EpisodeRunner,
    PlainFormat,
    episode_metrics,
    split_turn_rewards,
)
from .tools import JSONToolParser, TagToolParser, ToolCall, ToolCallError, ToolEnv

__all__ = [
    "ChatFormat", "EnvError", "EnvFactory", "Environment", "EpisodeInfo", "EpisodeRunner", "JSONToolParser",
    "PlainFormat", "StepResult", "TagToolParser", "ToolCall", "ToolCallError", "ToolEnv", "episode_metrics",
    "load_environment", "split_turn_rewards",
]
