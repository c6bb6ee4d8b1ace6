"""Rollouts: prompts in, scored samples out (docs/lm.md, "The training step and its batch sizes":
generate and score).

:class:`RolloutSampler` renders and encodes the prompts, asks the engine for ``k`` samples each
(or plays multi-turn episodes through it), decodes and scores them, adds length penalties and
process rewards, and drops groups it cannot train on (a reward error under
``reward_on_error=drop``; all-equal rewards under ``dynamic_filtering``, refilled from more
prompts). It knows nothing of the update: the trainer, or an asynchronous producer, calls it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..config import ConfigError
from ..core import EstimatorSpec, overlong_penalty, truncation_penalty
from ..engines import Generation, GenerationEngine, SamplingParams, get_engine
from ..errors import InputError
from ..rewards import TrainerState
from ..run.timer import PhaseTimer
from .config import LMConfig
from .data import columns_of, has_chat_template, render_prompt
from .models import prompt_limit
from .runtime import Runtime


@dataclass
class Rollout:
    """Scored samples: ``N = groups * samples_per_prompt`` responses, prompt by prompt."""

    rows: list[dict]
    """one dataset row per response"""
    prompts: list[str]
    completions: list[str]
    generation: Generation
    rewards: torch.Tensor
    per_source: dict[str, torch.Tensor]
    counts: dict[str, float]
    token_rewards: Optional[list[list[float]]] = None
    """process rewards: per response, one weighted reward per response token (``None``: no
    process-reward source)"""

    def take(self, index: list[int]) -> Rollout:
        """The responses at ``index``, in that order."""
        return Rollout(
            [self.rows[i] for i in index], [self.prompts[i] for i in index], [self.completions[i] for i in index],
            self.generation.take(index), self.rewards[index], {n: v[index] for n, v in self.per_source.items()},
            dict(self.counts), None if self.token_rewards is None else [self.token_rewards[i] for i in index],
        )

    @staticmethod
    def concat(parts: list[Rollout], counts: dict[str, float]) -> Rollout:
        tokens = None if parts[0].token_rewards is None else [x for p in parts for x in (p.token_rewards or [])]
        return Rollout(
            [x for p in parts for x in p.rows], [x for p in parts for x in p.prompts],
            [x for p in parts for x in p.completions],
            Generation.concat([p.generation for p in parts]), torch.cat([p.rewards for p in parts]),
            {n: torch.cat([p.per_source[n] for p in parts]) for n in parts[0].per_source}, counts, tokens,
        )


Scored = tuple[Generation, list[str], list[str], list[dict], Any]
"""``(generation, rendered prompts, completions, one dataset row per response, RewardResult)``"""


class RolloutSampler:
    """Generates and scores samples of the policy through ``engine``.

    Args:
        config: the run's config (sampling, prompts, rewards, filtering).
        rt: the runtime (rank, prompts per rank, precision, timer).
        engine: the generation engine.
        policy: the policy (its context bounds the prompt length; under FSDP its weights are
            gathered for generation).
        tokenizer: the policy's tokenizer.
        scorer: the reward scorer (None: an environment's rewards only).
        env_factory: multi-turn environments, or None.
        spec: the estimator (process rewards need token-level advantages).
        timer: where generation and scoring time go (default: the run's phase timer).
    """

    def __init__(self, config: LMConfig, rt: Runtime, engine: GenerationEngine, policy: torch.nn.Module, tokenizer: Any,
                 scorer: Any, env_factory: Optional[Callable[[], Any]], spec: EstimatorSpec,
                 timer: Optional[PhaseTimer] = None) -> None:
        self.config, self.rt, self.engine, self.policy, self.tokenizer = config, rt, engine, policy, tokenizer
        self.scorer, self.spec = scorer, spec
        self.timer = timer or rt.timer
        self.prompt_ids_cache: dict[str, list[int]] = {}
        self.prompts_truncated = 0
        self.episodes = self._episode_runner(env_factory) if env_factory is not None else None
        self.own_weights = get_engine(config.engine).own_weights

    def _episode_runner(self, env_factory: Callable[[], Any]) -> Any:
        """Multi-turn episodes through the same engine."""
        from ..agents import EpisodeRunner

        cfg = self.config
        return EpisodeRunner(env_factory, self.engine, self.tokenizer, render=self.render, encode=self.encode_prompt,
                             max_turns=cfg.max_turns, max_observation_tokens=cfg.max_observation_tokens,
                             chat=cfg.use_chat_template and has_chat_template(self.tokenizer),
                             prompt_column=cfg.prompt_column)

    def render(self, prompt: Any) -> str:
        return render_prompt(self.tokenizer, prompt, self.config.use_chat_template)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (cached: prompts recur every epoch). A prompt longer
        than :func:`~.models.prompt_limit` is refused, or cut to its last tokens with
        ``truncate_prompts`` (counted)."""
        if text not in self.prompt_ids_cache:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            limit = prompt_limit(self.policy, self.config.max_prompt_length, self.config.max_new_tokens)
            if len(ids) > limit:
                if not self.config.truncate_prompts:
                    raise InputError(f"a prompt has {len(ids)} tokens > {limit} allowed "
                                     "(max_prompt_length, or the model's context minus max_new_tokens); "
                                     f"shorten it or set truncate_prompts=true: {text[:60]!r}")
                ids = ids[len(ids) - limit :]
                self.prompts_truncated += 1
            self.prompt_ids_cache[text] = ids
        return self.prompt_ids_cache[text]

    def sampling(self, greedy: bool = False, temperature: Optional[float] = None) -> SamplingParams:
        cfg = self.config
        return SamplingParams(cfg.max_new_tokens, temperature or cfg.temperature, cfg.top_p, cfg.top_k, greedy)

    def generate_and_score(self, rows: list[dict], k: int, params: SamplingParams, step: int,
                           timer: Optional[PhaseTimer] = None) -> Scored:
        """``k`` samples of each row's prompt, scored (``step``: the RL step, for the rewards'
        trainer state)."""
        cfg = self.config
        timer = timer or self.timer
        expanded = [r for r in rows for _ in range(k)]
        columns = columns_of(expanded, exclude=(cfg.prompt_column,))
        if self.episodes is not None:  # multi-turn: the environment plays the other side
            from ..agents.rollout import score_episodes

            with timer("generate"):
                prompts, gen = self.episodes.run(rows, k, params)
            with timer("score"):
                assert gen.episodes is not None
                scores = score_episodes(self.scorer, prompts, gen, columns)
                return gen, prompts, gen.episodes.final_texts, expanded, scores
        rendered = [self.render(r[cfg.prompt_column]) for r in rows]
        # an engine with weights of its own (vllm, remote) never runs the policy: nothing to gather
        gather = contextlib.nullcontext() if self.own_weights else self.rt.parallel.full_weights(self.policy)
        with timer("generate"), self.rt.precision(), gather:
            gen = self.engine.generate([self.encode_prompt(text) for text in rendered], k, params)
        with timer("score"):
            prompts = [text for text in rendered for _ in range(k)]
            completions = self.tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
            chat = ([r[cfg.prompt_column] for r in expanded]
                    if rows and not isinstance(rows[0][cfg.prompt_column], str) else None)
            state = TrainerState(global_step=max(0, step - 1), max_steps=cfg.total_steps,
                                 epoch=max(0, step - 1) / cfg.total_steps)
            result = self.scorer(prompts, completions, columns, completion_ids=[list(r) for r in gen.response_ids],
                                 trainer_state=state, chat_prompts=chat)
        return gen, prompts, completions, expanded, result

    def rollout(self, next_rows: Callable[[], list[dict]], step: int) -> Rollout:
        """``samples_per_prompt`` responses to each of this rank's prompts (``next_rows()``
        draws the next global batch of rows), scored, whole groups only. Groups with a dropped
        sample (reward error, ``reward_on_error=drop``) are removed; with ``dynamic_filtering``
        so are groups whose rewards are all equal, and more prompts are drawn (up to
        ``max_filter_rounds`` rounds) to refill the batch."""
        cfg, rt = self.config, self.rt
        k = cfg.samples_per_prompt
        kept: list[Rollout] = []  # one whole group each
        counts = dict.fromkeys(("reward/dropped_samples", "reward/dropped_groups", "filter/dropped_groups"), 0.0)
        mine = slice(rt.dist.rank * rt.prompts_per_rank, (rt.dist.rank + 1) * rt.prompts_per_rank)
        round_ = 0
        rounds = cfg.max_filter_rounds if cfg.dynamic_filtering else 1
        for round_ in range(1, rounds + 1):  # noqa: B007 (reported after the loop)
            scored, dropped = self.scored_rollout(next_rows()[mine], step, counts, round_)
            for start in range(0, len(scored.rows), k):
                group = list(range(start, start + k))
                if bool(dropped[group].any()):
                    counts["reward/dropped_groups"] += 1
                elif cfg.dynamic_filtering and k > 1 and bool((scored.rewards[group] == scored.rewards[start]).all()):
                    counts["filter/dropped_groups"] += 1
                else:
                    kept.append(scored.take(group))
            if len(kept) >= rt.prompts_per_rank:
                break
        counts["filter/rounds"] = round_
        if cfg.truncate_prompts:
            counts["data/truncated_prompts"] = float(self.prompts_truncated)
        if not kept:
            raise nothing_to_train_on(step, counts, self.scorer)
        return Rollout.concat(kept[: rt.prompts_per_rank], counts)

    def scored_rollout(self, rows: list[dict], step: int, counts: dict[str, float],
                       round_: int = 1) -> tuple[Rollout, torch.Tensor]:
        """One round: ``k`` scored samples of each row, with length penalties, ``reward_noise``
        and process rewards, and the ``(N,)`` flags of the samples the reward dropped (counted in
        ``counts``)."""
        gen, prompts, completions, expanded, result = self.generate_and_score(rows, self.config.samples_per_prompt,
                                                                              self.sampling(), step)
        counts["reward/dropped_samples"] += float(result.dropped.sum())
        counts["reward/unscored_samples"] = counts.get("reward/unscored_samples", 0.0) + float(
            result.unscored.sum() if result.unscored is not None else 0)
        for key, value in result.extras.items():  # verl's extra keys, OpenRLHF's extra_logs (first round)
            counts.setdefault(f"reward/{key}", value)
        rewards = result.rewards + self.length_penalties(gen) + self.reward_noise(len(gen), step, round_)
        scored = Rollout(expanded, prompts, completions, gen, rewards, result.per_source, {},
                         self.process_rewards(result, gen, completions))
        return scored, result.dropped

    def process_rewards(self, result: Any, gen: Generation, completions: list[str]) -> Optional[list[list[float]]]:
        """Weighted per-token rewards of the process-reward sources, one list per response."""
        if not result.token_rewards:
            return None
        from ..rewards.process import process_token_rewards

        if not self.spec.kl_in_reward:
            raise ConfigError(f"reward source(s) {sorted(result.token_rewards)} return "
                              f"per-token/per-step rewards, but estimator {self.config.estimator!r} "
                              "broadcasts one advantage per response; use reinforce_pp, reinforce or gae")
        weights = {s.name: s.weight for s in self.scorer.sources}
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        out = [[0.0] * len(ids) for ids in gen.response_ids]
        for name, per_sample in result.token_rewards.items():
            where = self.scorer.where(next(s for s in self.scorer.sources if s.name == name))
            for i, values in enumerate(per_sample):
                if values is not None and not bool(result.dropped[i]):
                    tokens = process_token_rewards(values, completions[i], gen.response_ids[i], decode,
                                                   self.config.reward_step_delimiter, where)
                    out[i] = [a + weights[name] * b for a, b in zip(out[i], tokens)]
        return out

    def reward_noise(self, n: int, step: int, round_: int) -> torch.Tensor:
        """``reward_noise``: Gaussian noise on the ``n`` training rewards of a round, ``(n,)``, drawn
        from its own generator (run seed, rank, step, round), so resumed runs repeat it."""
        std = self.config.reward_noise
        if not std:
            return torch.zeros(n)
        seed = ((self.config.seed * 1_000_003 + self.rt.dist.rank) * 1_000_003 + step) * 101 + round_
        return std * torch.randn(n, generator=torch.Generator().manual_seed(seed % 2**63))

    def length_penalties(self, gen: Generation) -> torch.Tensor:
        """DAPO's overlong penalty and the truncation penalty, per response ``(N,)``."""
        cfg = self.config
        masks = gen.response_masks
        # the model's tokens
        lengths = torch.tensor([sum(m) for m in masks] if masks is not None else [len(r) for r in gen.response_ids])
        penalty = torch.zeros(len(lengths))
        if cfg.overlong_buffer:
            penalty += overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        if cfg.truncation_penalty:
            penalty += truncation_penalty(gen.truncated, cfg.truncation_penalty)
        return penalty


def nothing_to_train_on(step: int, counts: dict[str, float], scorer: Any) -> InputError:
    """The one-line error of a step whose every group was dropped, saying why: the reward sources
    that dropped samples (``reward_on_error=drop``), samples no source scored, all-equal rewards
    under ``dynamic_filtering``."""
    why = []
    if counts.get("reward/dropped_groups"):
        failing = [f"{scorer.where(s)}: {scorer.dropped_counts[s.name]} samples so far"
                   for s in getattr(scorer, "sources", []) if scorer.dropped_counts.get(s.name)]
        unscored = int(counts.get("reward/unscored_samples", 0))
        if unscored:
            failing.append(f"{unscored} samples no reward source scored (all returned None)")
        detail = "; ".join(failing) or "reward_on_error=drop"
        why.append(f"{int(counts['reward/dropped_groups'])} groups held a sample the reward dropped ({detail})")
    if counts.get("filter/dropped_groups"):
        rounds = int(counts.get("filter/rounds", 1))
        why.append(f"{int(counts['filter/dropped_groups'])} groups had all-equal rewards (dynamic_filtering, "
                   f"{rounds} generation round{'s' if rounds > 1 else ''})")
    return InputError(f"step {step}: every group was dropped, nothing to train on: {'; '.join(why)}")
