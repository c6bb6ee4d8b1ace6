"""The built-in tool task (``task=tools``): add two 4-digit numbers with a calculator tool.

The tiny model cannot add 4-digit numbers in its head (and is never taught to), but it can
learn to call the tool and copy its answer::

    prompt    5821+9377=
    turn 1    <t>add 5821 9377</t><eos>        (model)
    obs 1     <r>15198</r>                     (environment: the tool's output)
    turn 2    15198<eos>                       (model: the final answer)

(:class:`~reinforcepp.agents.tools.TagToolParser` with short tags ``<t>``/``<r>``: every
character is a token for the tiny model, and shorter episodes train faster.)

The warm start imitates mixed-quality demonstrations: a fraction ``sft_wrong_fraction`` answer
at once, without the tool, with a guess (a random number of the right size); the rest call the
tool and copy the result. (The guesses carry no rule the model could learn instead of copying;
a computable wrong rule such as the no-carry sum competes with copying and the warm-started
model then ignores the tool's output.) After it the
model mostly answers without the tool; RL with the exact-match reward on the final answer has to
discover that calling the tool pays.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from .tools import TagToolParser, ToolEnv

TOOL_TIMEOUT = 5.0
PARSER = TagToolParser(open="<t>", close="</t>", result_open="<r>", result_close="</r>")


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def make_example(rng: random.Random) -> tuple[str, str, str]:
    """rng -> (prompt, answer, distractor: a guess, a random number of the answer's size).
    Both numbers are >= 5000, so every sum has 5 digits (the answer sits at a fixed distance
    from the tool's output)."""
    a, b = rng.randint(5000, 9999), rng.randint(5000, 9999)
    guess = rng.randint(10000, 19998)
    if guess == a + b:
        guess += 1
    return f"{a}+{b}=", str(a + b), str(guess)


def tool_call_text(prompt: str) -> str:
    """The demonstrated tool call for a prompt ``"A+B="``."""
    a, b = prompt.rstrip("=").split("+")
    return f"{PARSER.open}add {a} {b}{PARSER.close}"


def make_env() -> ToolEnv:
    """The task's environment: the ``add`` tool behind ``<t>...</t>`` tags."""
    return ToolEnv([add], parser=PARSER, timeout=TOOL_TIMEOUT)


def demonstration_turns(row: dict[str, Any]) -> list[str]:
    """The model turns of a row's demonstration: call then answer when the demonstration is the
    right answer, a direct (wrong) answer otherwise."""
    if row["demonstration"] == row["answer"]:
        return [tool_call_text(row["prompt"]), row["answer"]]
    return [row["demonstration"]]


def demonstration_episode(
    env: Any, row: dict[str, Any], prompt_ids: list[int], turns: Sequence[str], tokenizer: Any, observation_ids: Any
) -> tuple[list[int], list[int]]:
    """``(response_ids, response_mask)`` of a demonstrated episode, with the observations the
    environment really returns (so the warm start sees exactly what rollouts will)."""
    from .protocol import check_step
    from .rollout import _resolve

    env.reset(row)
    ids: list[int] = []
    mask: list[int] = []
    for turn, text in enumerate(turns, 1):
        turn_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        ids += turn_ids
        mask += [1] * len(turn_ids)
        result = check_step(env, turn, _resolve([env.step(text)])[0])
        if result.done or turn == len(turns):
            break
        obs = observation_ids(result.observation, "tool")
        ids += obs
        mask += [0] * len(obs)
    return ids, mask
