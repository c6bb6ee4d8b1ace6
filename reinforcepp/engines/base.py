"""What every generation engine shares: the request, the result, the protocol, the weights.

The trainer asks an engine for samples and knows nothing else about it:

* :class:`SamplingParams` -- the request (length, temperature, top-p, top-k, greedy);
* :class:`Generation` -- the result: ``k`` samples for each of ``P`` prompts, laid out prompt by
  prompt, with the log-probs the engine sampled each token with and the policy version that
  generated it;
* :class:`GenerationEngine` -- the protocol (``generate``, ``sync_weights``, ``sleep`` and the
  ``weight_version`` it samples with); :class:`StagingEngine` -- the optional capability of
  taking weight versions ahead of sampling with them (``stage_weights``, ``use_version``);
* :data:`WeightProvider` / :func:`full_weights` -- how an engine with its own copy of the weights
  gets the policy's current ones after an update.

Also here, because engines and trainers lay model inputs out the same way: :func:`left_pad` and
:func:`position_ids_from_mask`. Multi-turn episodes (``reinforcepp.agents``) fill the episode
fields of :class:`Generation` (:class:`EpisodeInfo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol, Sequence, TypeGuard

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    seed: Optional[int] = None
    """the draws' own seed (the same seed, weights and prompts give the same samples); None = the
    process's global torch generator. The samples of prompt ``i`` of a call draw from their own
    generator, seeded with :func:`prompt_seed` ``(seed, i)``, so a call split into parts (over
    rollout servers) gives the samples of the whole call. Engines registered with
    ``seeded=False`` ignore it."""
    prompt_seeds: Optional[tuple[int, ...]] = None
    """one seed per prompt, used instead of ``seed`` (what a rollout server receives for its share
    of a call's prompts: ``prompt_seed(seed, i)`` for each prompt ``i`` it got)"""

    def seeds_for(self, n: int) -> Optional[list[int]]:
        """The seeds of the ``n`` prompts of a call: ``prompt_seeds``, else :func:`prompt_seed`
        ``(seed, i)`` for ``i < n``, else None (unseeded)."""
        if self.prompt_seeds is not None:
            if len(self.prompt_seeds) != n:
                raise ValueError(f"{len(self.prompt_seeds)} prompt_seeds for {n} prompts")
            return list(self.prompt_seeds)
        return None if self.seed is None else [prompt_seed(self.seed, i) for i in range(n)]


def prompt_seed(seed: int, index: int) -> int:
    """The 63-bit seed of prompt ``index`` of a call seeded with ``seed`` (splitmix64 over the two)."""
    x = 0
    for part in (seed, index):
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


@dataclass
class EpisodeInfo:
    """Per-episode results of multi-turn rollouts, aligned with the ``N`` rows of a :class:`Generation`."""

    final_texts: list[str]
    """the last model turn's text (what reward functions score)"""
    transcripts: list[str]
    """everything after the prompt, decoded (for the samples log)"""
    env_rewards: Tensor
    """``(N,)`` sum of the environment's rewards over the episode"""
    turn_rewards: list[list[tuple[int, float]]]
    """per episode: ``(response position of the turn's last token, reward)`` for every turn"""
    stats: dict[str, Tensor] = field(default_factory=dict)
    """``(N,)`` counters: ``turns``, ``turn_limit`` (max_turns reached without done), and the
    sums of the environment's ``info`` (``tool_calls``, ``tool_errors``, ...)"""

    def select(self, index: Sequence[int]) -> EpisodeInfo:
        idx = list(index)
        return EpisodeInfo([self.final_texts[i] for i in idx], [self.transcripts[i] for i in idx],
                           self.env_rewards[idx],
                           [self.turn_rewards[i] for i in idx], {k: v[idx] for k, v in self.stats.items()})

    @staticmethod
    def concat(parts: Sequence[EpisodeInfo]) -> EpisodeInfo:
        keys = sorted({k for p in parts for k in p.stats})
        n = [len(p.final_texts) for p in parts]
        return EpisodeInfo([x for p in parts for x in p.final_texts], [x for p in parts for x in p.transcripts],
                           torch.cat([p.env_rewards for p in parts]), [x for p in parts for x in p.turn_rewards],
                           {k: torch.cat([p.stats.get(k, torch.zeros(m)) for p, m in zip(parts, n)]) for k in keys})


def _pick(values: Optional[list], index: Sequence[int]) -> Optional[list]:
    return None if values is None else [values[i] for i in index]


def _join(parts: Sequence[Optional[list]]) -> Optional[list]:
    if any(p is None for p in parts):
        return None
    return [x for p in parts for x in (p or [])]


@dataclass
class Generation:
    """``k`` samples for each of ``P`` prompts, laid out prompt by prompt (``N = P * k``).

    Attributes:
        prompt_ids: ``N`` token lists (each prompt repeated ``k`` times).
        response_ids: ``N`` token lists, up to and including EOS when one was generated.
        truncated: ``(N,)`` bool, True where ``max_new_tokens`` was reached without EOS.
        sampler_logprobs: ``N`` float lists aligned with ``response_ids``: the log-prob the
            engine sampled each token with (the behaviour policy); ``None`` when the engine
            does not report them.
        response_masks: multi-turn episodes only: ``N`` 0/1 lists as long as the responses, 1 on
            the model's own tokens and 0 on the environment's (``None`` = every token is the model's).
        episodes: multi-turn episodes only: their per-episode results (:class:`EpisodeInfo`).
        token_versions: ``N`` int lists aligned with ``response_ids``: the policy version
            (:attr:`GenerationEngine.weight_version`) that sampled each token; ``None`` = unknown.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    truncated: Tensor
    sampler_logprobs: Optional[list[list[float]]] = None
    response_masks: Optional[list[list[int]]] = None
    episodes: Optional[EpisodeInfo] = None
    token_versions: Optional[list[list[int]]] = None

    def __len__(self) -> int:
        return len(self.response_ids)

    def take(self, index: Sequence[int]) -> Generation:
        """The responses at ``index``, in that order."""
        index = list(index)
        return Generation([self.prompt_ids[i] for i in index], [self.response_ids[i] for i in index],
                          self.truncated[index],
                          _pick(self.sampler_logprobs, index), _pick(self.response_masks, index),
                          None if self.episodes is None else self.episodes.select(index),
                          _pick(self.token_versions, index))

    @staticmethod
    def concat(parts: Sequence[Generation]) -> Generation:
        episodes = [g.episodes for g in parts]
        return Generation([x for g in parts for x in g.prompt_ids], [x for g in parts for x in g.response_ids],
                          torch.cat([g.truncated for g in parts]), _join([g.sampler_logprobs for g in parts]),
                          _join([g.response_masks for g in parts]),
                          None if any(e is None for e in episodes)
                          else EpisodeInfo.concat([e for e in episodes if e is not None]),
                          _join([g.token_versions for g in parts]))

    def with_version(self, version: int) -> Generation:
        """This generation with every token marked as sampled by policy ``version``."""
        self.token_versions = [[version] * len(r) for r in self.response_ids]
        return self

    def token_version_tensor(self, response_length: int) -> Optional[Tensor]:
        """``(N, response_length)`` long, right-padded with 0 (like the response tokens)."""
        if self.token_versions is None:
            return None
        out = torch.zeros(len(self.token_versions), response_length, dtype=torch.long)
        for i, row in enumerate(self.token_versions):
            row = row[:response_length]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def sampler_logprob_tensor(self, response_length: int) -> Optional[Tensor]:
        """``(N, response_length)`` float32, right-padded with 0 (like the response tokens)."""
        if self.sampler_logprobs is None:
            return None
        out = torch.zeros(len(self.sampler_logprobs), response_length)
        for i, row in enumerate(self.sampler_logprobs):
            row = row[:response_length]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return out


WeightProvider = Callable[[], Iterable[tuple[str, Tensor]]]
"""Returns the policy's full weights as ``(name, tensor)`` pairs, named as in its Hugging Face
checkpoint. The default is :func:`full_weights`; a sharded policy gathers its shards, a LoRA
policy merges its adapters, and hands that function to :meth:`GenerationEngine.sync_weights`."""


def full_weights(model: torch.nn.Module) -> WeightProvider:
    """The provider of an unsharded model: its parameters (tied ones once) and persistent buffers."""

    def provide() -> list[tuple[str, Tensor]]:
        persistent = set(model.state_dict().keys())
        named: dict[str, Tensor] = dict(model.named_parameters())
        named.update((n, b) for n, b in model.named_buffers() if n in persistent)
        return [(n, t.detach()) for n, t in named.items()]

    return provide


class GenerationEngine(Protocol):
    """Samples responses from the policy. Engines are registered by name
    (:func:`reinforcepp.engines.register_engine`)."""

    weight_version: int
    """The policy version the engine samples with: 0 for the initial weights, then the
    ``version`` of the last :meth:`sync_weights`."""

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams
    ) -> Generation:
        """``samples_per_prompt`` responses to each prompt, prompt by prompt."""
        ...

    def sync_weights(
        self, model: torch.nn.Module, weights: Optional[WeightProvider] = None, *, version: int = 0
    ) -> None:
        """Make the engine sample from the policy's current weights: ``weights()`` when given
        (a sharded or LoRA policy's full weights), else ``model``'s own, and report ``version``
        from now on. Engines that share the model only record the version. The trainer calls
        it after every update that changed the weights."""
        ...

    def sleep(self) -> None:
        """Free memory the engine does not need until its next ``sync_weights`` or
        ``generate`` (the trainer calls it after each rollout; a no-op for most engines)."""
        ...


class StagingEngine(GenerationEngine, Protocol):
    """An engine that takes a weight version ahead of sampling with it (``engine=remote``: rollout
    servers hold several versions). Optional: the trainer and the asynchronous producer check
    for it with :func:`can_stage`; every other engine works as before.

    * :meth:`stage_weights` at publish time (the trainer's thread, every rank) hands the version
      over; the producer keeps no snapshot of the weights for such an engine;
    * :meth:`use_version` when the producer's schedule reaches the version (no weights move);
    * ``sync_weights(model, weights, version=v)`` is ``stage_weights(weights, version=v)`` then
      ``use_version(v)``.
    """

    def stage_weights(self, weights: Optional[WeightProvider], *, version: int) -> None:
        """Hand over policy ``version``: ``weights()``, or None when they equal the previous
        version's (an update that changed nothing). Collective under torchrun: every rank calls
        it, in the same order, and iterates the provider to its end."""
        ...

    def use_version(self, version: int) -> None:
        """Sample with staged ``version`` from now on."""
        ...


def can_stage(engine: object) -> TypeGuard[StagingEngine]:
    """Whether ``engine`` implements :class:`StagingEngine`."""
    return callable(getattr(engine, "stage_weights", None)) and callable(getattr(engine, "use_version", None))


def split_responses(
    sequences: Tensor, eos_token_id: int | Sequence[int], max_new_tokens: int
) -> tuple[list[list[int]], Tensor]:
    """Cut generated ``(N, T)`` token rows after the first EOS; flag rows with no EOS."""
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.isin(sequences, eos)
    has_eos = is_eos.any(dim=1)
    last = torch.full_like(has_eos, sequences.shape[1] - 1, dtype=torch.long)
    first = torch.where(has_eos, is_eos.float().argmax(dim=1), last)
    rows = [sequences[i, : int(first[i]) + 1].tolist() for i in range(sequences.shape[0])]
    truncated = ~has_eos & torch.tensor([len(r) >= max_new_tokens for r in rows])
    return rows, truncated


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> ``(ids, attention_mask)``, each ``(N, longest)``, padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            attn[i, width - len(r) :] = 1
    return ids, attn


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses: ``cumsum(mask) - 1``, 0 on pads."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
