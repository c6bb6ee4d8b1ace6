"""Multi-turn rollouts through any :class:`~reinforcepp.engines.GenerationEngine`.

One episode is tokenised as one sequence: ``[prompt | turn 1 | obs 1 | turn 2 | ... | turn n]``.
The engine generates one turn at a time from the transcript so far (so ``hf``, ``hf_generate``
and a vLLM engine all work unchanged); the environment answers each turn. The result is the
single-turn :class:`~reinforcepp.engines.Generation` layout, with

* ``response_ids``: everything after the prompt (model turns and observations);
* ``response_masks``: 1 on the model's own tokens (each turn up to and including its EOS),
  0 on observation tokens, so log-probs, KL, token rewards, whitening, loss aggregation and
  ``response/length`` count only the model's tokens;
* ``episodes``: :class:`EpisodeInfo` (final answers, environment rewards, per-turn rewards,
  counters such as turns and tool calls).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..engines import EpisodeInfo, Generation, GenerationEngine, SamplingParams
from .protocol import (
    EnvError,
    EnvFactory,
    Prompt,
    StepResult,
    check_prompt,
    check_step,
    env_name,
)


class PlainFormat:
    """Observations are appended as raw text (the tiny model, base models)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def observation_ids(self, text: str, role: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class ChatFormat:
    """Observations are chat messages (``role`` ``tool`` by default, or ``user``) rendered by
    the tokenizer's chat template: the ids are the text the template puts between the end of
    an assistant turn (after its EOS) and the start of the next assistant turn."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._frames: dict[str, tuple[str, str]] = {}

    def _frame(self, role: str) -> tuple[str, str]:
        if role not in self._frames:
            tok = self.tokenizer
            marker, reply = "\x00OBS\x00", "\x00ANSWER\x00"
            base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]
            closed = tok.apply_chat_template(base, tokenize=False)
            full = tok.apply_chat_template(base + [{"role": role, "content": marker}], tokenize=False,
                                           add_generation_prompt=True)
            if not full.startswith(closed[: closed.index(reply)]) or marker not in full:
                raise EnvError(f"the chat template cannot render a {role!r} message after an assistant turn")
            after_reply = full[full.index(reply) + len(reply) :]
            eos = tok.eos_token or ""
            if eos and after_reply.startswith(eos):
                after_reply = after_reply[len(eos) :]  # the model generated its EOS itself
            head, tail = after_reply.split(marker, 1)
            self._frames[role] = (head, tail)
        return self._frames[role]

    def observation_ids(self, text: str, role: str) -> list[int]:
        head, tail = self._frame(role)
        return list(self.tokenizer(head + text + tail, add_special_tokens=False)["input_ids"])


def _resolve(values: list[Any]) -> list[Any]:
    """Await the awaitables among ``values`` concurrently; plain values pass through."""
    pending = [i for i, v in enumerate(values) if inspect.isawaitable(v)]
    if pending:
        async def gather() -> list[Any]:
            return await asyncio.gather(*(values[i] for i in pending))

        for i, v in zip(pending, asyncio.run(gather())):
            values[i] = v
    return values


class EpisodeRunner:
    """Plays ``k`` episodes per row with fresh environments from ``factory``.

    Args:
        factory: called with no argument for every episode.
        engine: any generation engine.
        tokenizer: the policy's tokenizer.
        render: ``render(prompt) -> text`` of the episode's first prompt (chat template or not).
        encode: ``encode(text) -> ids`` of the rendered prompt.
        max_turns: model turns per episode at most.
        max_observation_tokens: observations are cut to this many tokens.
        chat: observations rendered as chat messages (:class:`ChatFormat`), else raw text.
    """

    def __init__(self, factory: EnvFactory, engine: GenerationEngine, tokenizer: Any, *,
                 render: Callable[[Prompt], str],
                 encode: Callable[[str], list[int]], max_turns: int, max_observation_tokens: int, chat: bool = False,
                 prompt_column: str = "prompt") -> None:
        self.factory, self.engine, self.tokenizer = factory, engine, tokenizer
        self.render, self.encode = render, encode
        self.max_turns, self.max_observation_tokens = max_turns, max_observation_tokens
        self.format = ChatFormat(tokenizer) if chat else PlainFormat(tokenizer)
        self.prompt_column = prompt_column

    def run(self, rows: Sequence[dict[str, Any]], k: int, params: SamplingParams) -> tuple[list[str], Generation]:
        """Episodes for ``k`` samples of each row, laid out row by row (``N = len(rows) * k``).
        Returns the rendered prompts (``N``) and the :class:`Generation`."""
        expanded = [r for r in rows for _ in range(k)]
        envs = [self.factory() for _ in expanded]
        starts = _resolve([e.reset(r) for e, r in zip(envs, expanded)])
        prompts = [check_prompt(e, p, r, self.prompt_column) for e, r, p in zip(envs, expanded, starts)]
        rendered = [self.render(p) for p in prompts]
        prompt_ids = [self.encode(t) for t in rendered]
        shared = all(rendered[i] == rendered[i - i % k] for i in range(len(expanded)))
        episodes = _Transcripts(len(expanded))
        active = list(range(len(expanded)))
        for turn in range(1, self.max_turns + 1):
            if turn == 1 and shared:
                gen = self.engine.generate(prompt_ids[::k], k, params)
            else:
                gen = self.engine.generate([prompt_ids[i] + episodes.responses[i] for i in active], 1, params)
            texts = self.tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
            steps = _resolve([envs[i].step(t) for i, t in zip(active, texts)])
            still = []
            for j, i in enumerate(active):
                result: StepResult = check_step(envs[i], turn, steps[j])
                episodes.add_turn(i, gen, j, texts[j], result)
                if result.done:
                    continue
                if turn == self.max_turns:
                    episodes.stats["turn_limit"][i] = 1
                    continue
                obs = self.format.observation_ids(result.observation, getattr(envs[i], "observation_role", "tool"))
                obs = obs[: self.max_observation_tokens]
                if not obs:
                    raise EnvError(f"environment {env_name(envs[i])}, turn {turn}: "
                                   "an empty observation on a turn that is not done")
                episodes.add_observation(i, obs)
                still.append(i)
            active = still
            if not active:
                break
        return rendered, episodes.generation(prompt_ids, self.tokenizer)


class _Transcripts:
    """The ``n`` episodes of one :meth:`EpisodeRunner.run` as they grow, turn by turn: tokens,
    masks (1 on the model's tokens), the engine's log-probs and policy versions (kept only when
    every turn reports them), the final answers, the rewards and counters."""

    def __init__(self, n: int) -> None:
        self.responses: list[list[int]] = [[] for _ in range(n)]
        self.masks: list[list[int]] = [[] for _ in range(n)]
        self.truncated = torch.zeros(n, dtype=torch.bool)
        self.logprobs: list[list[float]] | None = [[] for _ in range(n)]
        self.versions: list[list[int]] | None = [[] for _ in range(n)]
        self.final = [""] * n
        self.turn_rewards: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        self.stats: dict[str, Tensor] = {"turns": torch.zeros(n), "turn_limit": torch.zeros(n)}

    def add_turn(self, i: int, gen: Generation, j: int, text: str, result: StepResult) -> None:
        """Episode ``i``'s model turn: row ``j`` of ``gen``, decoded as ``text``, and the environment's answer."""
        tokens = gen.response_ids[j]
        self.responses[i] += tokens
        self.masks[i] += [1] * len(tokens)
        self.logprobs = None if gen.sampler_logprobs is None or self.logprobs is None else self.logprobs
        if self.logprobs is not None and gen.sampler_logprobs is not None:
            self.logprobs[i] += list(gen.sampler_logprobs[j])
        self.versions = None if gen.token_versions is None or self.versions is None else self.versions
        if self.versions is not None and gen.token_versions is not None:
            self.versions[i] += list(gen.token_versions[j])
        self.truncated[i] = gen.truncated[j]
        self.final[i] = text
        self.stats["turns"][i] += 1
        self.turn_rewards[i].append((len(self.responses[i]) - 1, result.reward))
        for key, value in result.info.items():
            self.stats.setdefault(key, torch.zeros(len(self.responses)))[i] += value

    def add_observation(self, i: int, obs: list[int]) -> None:
        """The environment's tokens after episode ``i``'s turn (masked out of the loss)."""
        self.responses[i] += obs
        self.masks[i] += [0] * len(obs)
        if self.logprobs is not None:
            self.logprobs[i] += [0.0] * len(obs)  # masked out: never used
        if self.versions is not None:
            self.versions[i] += [self.versions[i][-1] if self.versions[i] else 0] * len(obs)

    def generation(self, prompt_ids: list[list[int]], tokenizer: Any) -> Generation:
        transcripts = tokenizer.batch_decode(self.responses, skip_special_tokens=False)
        env_rewards = torch.tensor([sum(r for _, r in tr) for tr in self.turn_rewards], dtype=torch.float32)
        info = EpisodeInfo(self.final, transcripts, env_rewards, self.turn_rewards, self.stats)
        return Generation(prompt_ids, self.responses, self.truncated, sampler_logprobs=self.logprobs,
                          response_masks=self.masks,
                          episodes=info, token_versions=self.versions)


def split_turn_rewards(
    rewards: Tensor, generation: Generation, response_length: int, token_level: bool
) -> tuple[Tensor, Tensor | None]:
    """Where the rewards of a multi-turn episode go (see docs/agents.md, "Rewards").

    The final turn's reward is part of the scalar ``R_i`` (``rewards``), on the episode's last
    model token like any outcome reward. Rewards of earlier turns: for token-level estimators
    (``token_level``: reinforce_pp, reinforce_pp_baseline, reinforce, gae) they become
    ``step_rewards`` on the last token of their turn and are taken out of ``R_i``; estimators
    that broadcast one advantage per response see them inside ``R_i``.

    Returns:
        ``(rewards (N,), step_rewards (N, T) or None)``.
    """
    info = generation.episodes
    if info is None or not token_level:
        return rewards, None
    step = torch.zeros(len(info.turn_rewards), response_length)
    for i, turns in enumerate(info.turn_rewards):
        for pos, r in turns[:-1]:
            step[i, pos] += r
    if not bool(step.any()):
        return rewards, None
    return rewards - step.sum(1), step


def episode_metrics(generation: Generation) -> dict[str, float]:
    """``env/*`` means over the batch's episodes: turns per episode, the fraction that hit
    ``max_turns``, the environment's reward, and every ``info`` counter per episode, with
    ``env/tool_call_rate`` (episodes with at least one tool call) and
    ``env/tool_error_rate`` (failed calls / calls) when the environment reports tool calls."""
    info = generation.episodes
    if info is None:
        return {}
    m = {f"env/{k}_per_episode" if k not in ("turns", "turn_limit") else f"env/{k}": float(v.mean())
         for k, v in info.stats.items()}
    m["env/turn_limit"] = m.pop("env/turn_limit")
    m["env/reward_mean"] = float(info.env_rewards.mean())
    if "tool_calls" in info.stats:
        calls = info.stats["tool_calls"]
        m["env/tool_call_rate"] = float((calls > 0).float().mean())
        errors = (info.stats.get("tool_errors", torch.zeros_like(calls)).sum()
                  + info.stats.get("tool_timeouts", torch.zeros_like(calls)).sum())
        m["env/tool_error_rate"] = float(errors / calls.sum().clamp_min(1))
    return m


def score_episodes(scorer: Any, prompts: list[str], generation: Generation, columns: dict[str, list]) -> Any:
    """``R_i`` of each episode: the reward functions on the final answer (when there are any)
    plus the environment's rewards over the episode (logged as ``reward/env``)."""
    from ..rewards import RewardResult

    info = generation.episodes
    assert info is not None
    if scorer is None:
        no_answer = torch.zeros(len(prompts), dtype=torch.bool)
        return RewardResult(info.env_rewards.clone(), {"env": info.env_rewards}, no_answer)
    result = scorer(prompts, info.final_texts, columns)
    result.rewards = torch.where(result.dropped, result.rewards, result.rewards + info.env_rewards)
    result.per_source = {**result.per_source, "env": info.env_rewards}
    return result
