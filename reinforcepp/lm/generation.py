"""Generation engines: the trainer asks an engine for samples and knows nothing else about it.

An engine implements :class:`GenerationEngine`. Two ship, both sampling from the policy being
trained (KV cache, left-padded prompts, temperature / top-p / top-k, stop at EOS, truncation
flagged): ``hf`` (:class:`SharedPromptSampler`, the default), a decoding loop over the model's
cached forward that runs each prompt once for all its samples, and ``hf_generate``
(:class:`HFGenerationEngine`), ``transformers``' own ``generate``. ``vllm``
(:mod:`reinforcepp.lm.vllm_engine`) samples with vLLM and holds its own copy of the weights,
which the trainer refreshes with :meth:`GenerationEngine.sync_weights` after every update.
Other engines plug in through the same interface and :func:`register_engine`.

Every engine returns the log-probs it sampled each token with (``sampler_logprobs``, under the
distribution actually sampled from: temperature, top-k and top-p applied), which the trainer
compares with its own recomputed ``old_logprobs`` (``rollout/logprob_abs_diff_*``) and uses for
truncated importance sampling (``tis_cap``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Protocol, Sequence, cast

import torch
from torch import Tensor

from .batch import left_pad

if TYPE_CHECKING:
    from ..agents.rollout import EpisodeInfo


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass
class Generation:
    """``k`` samples for each of ``P`` prompts, laid out prompt by prompt (``N = P * k``).

    Attributes:
        prompt_ids: ``N`` token lists (each prompt repeated ``k`` times).
        response_ids: ``N`` token lists, up to and including EOS when one was generated.
        truncated: ``(N,)`` bool, True where ``max_new_tokens`` was reached without EOS.
        sampler_logprobs: ``N`` float lists aligned with ``response_ids``: the log-prob the
            engine sampled each token with; ``None`` when the engine does not report them.
        response_masks: multi-turn episodes only: ``N`` 0/1 lists as long as the responses, 1 on
            the model's own tokens and 0 on the environment's (``None`` = every token is the model's).
        episodes: multi-turn episodes only: their per-episode results (reinforcepp.agents).
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    truncated: Tensor
    sampler_logprobs: Optional[list[list[float]]] = None
    response_masks: Optional[list[list[int]]] = None
    episodes: Optional["EpisodeInfo"] = None

    def take(self, index: Sequence[int]) -> "Generation":
        """The responses at ``index``, in that order."""
        index = list(index)
        lp, masks = self.sampler_logprobs, self.response_masks
        return Generation([self.prompt_ids[i] for i in index], [self.response_ids[i] for i in index], self.truncated[index],
                          None if lp is None else [lp[i] for i in index], None if masks is None else [masks[i] for i in index],
                          None if self.episodes is None else self.episodes.select(index))

    @staticmethod
    def concat(parts: Sequence["Generation"]) -> "Generation":
        has_lp = all(g.sampler_logprobs is not None for g in parts)
        has_masks = all(g.response_masks is not None for g in parts)
        episodes = None
        if all(g.episodes is not None for g in parts):
            from ..agents.rollout import EpisodeInfo

            episodes = EpisodeInfo.concat([g.episodes for g in parts if g.episodes is not None])
        return Generation([x for g in parts for x in g.prompt_ids], [x for g in parts for x in g.response_ids], torch.cat([g.truncated for g in parts]),
                          [x for g in parts for x in g.sampler_logprobs or []] if has_lp else None,
                          [x for g in parts for x in g.response_masks or []] if has_masks else None, episodes)
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
    def generate(self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams) -> Generation: ...

    def sync_weights(self, model: torch.nn.Module, weights: Optional[WeightProvider] = None) -> None:
        """Make the engine sample from the policy's current weights: ``weights()`` when given
        (a sharded or LoRA policy's full weights), else ``model``'s own. A no-op for engines
        that share the model. The trainer calls it after every update that changed them."""
        ...

    def sleep(self) -> None:
        """Free memory the engine does not need until its next ``sync_weights`` or
        ``generate`` (the trainer calls it after each rollout; a no-op for most engines)."""
        ...


def split_responses(sequences: Tensor, eos_token_id: int | Sequence[int], max_new_tokens: int) -> tuple[list[list[int]], Tensor]:
    """Cut generated ``(N, T)`` token rows after the first EOS; flag rows with no EOS."""
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.isin(sequences, eos)
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, sequences.shape[1] - 1, dtype=torch.long))
    rows = [sequences[i, : int(first[i]) + 1].tolist() for i in range(sequences.shape[0])]
    truncated = ~has_eos & torch.tensor([len(r) >= max_new_tokens for r in rows])
    return rows, truncated


class HFGenerationEngine:
    """Sampling with ``model.generate`` on the training model itself (weights always in sync)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu", config=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    def sync_weights(self, model: torch.nn.Module, weights: Optional[WeightProvider] = None) -> None:
        self.model = model  # the engine samples from the training model itself: nothing to copy

    def sleep(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams) -> Generation:
        from transformers import GenerationConfig

        tok = self.tokenizer
        ids, attn = left_pad(prompt_ids, tok.pad_token_id)
        width = ids.shape[1]
        # Sampling values are explicit: None would fall back to transformers' defaults (top_k=50).
        sampling = {} if params.greedy else dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        gen_config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            **sampling,
            num_return_sequences=samples_per_prompt,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            out = cast(Any, self.model).generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), generation_config=gen_config,
                                                 output_scores=True, return_dict_in_generate=True)
        finally:
            self.model.train(was_training)
        new = out.sequences[:, width:]
        # scores are the processed logits (temperature, top-k, top-p applied): the sampled distribution
        logprobs = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, new[:, t : t + 1]).squeeze(-1) for t, s in enumerate(out.scores)], 1)
        responses, truncated = split_responses(new.cpu(), tok.eos_token_id, params.max_new_tokens)
        prompts = [list(p) for p in prompt_ids for _ in range(samples_per_prompt)]
        return Generation(prompts, responses, truncated, [logprobs[i, : len(r)].tolist() for i, r in enumerate(responses)])


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """The sampling distribution's logits, as ``generate`` builds them: ``z / temperature``,
    then top-k (keep the ``k`` largest; 0 = off), then top-p (keep the smallest set of largest
    tokens whose probability reaches ``p``; 1 = off). Removed entries become ``-inf``.
    ``(B, V)`` -> ``(B, V)`` float32."""
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens before it already reach top_p
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return z


class SharedPromptSampler(HFGenerationEngine):
    """The default engine: a sampling loop over a Hugging Face causal LM that runs each prompt
    once for all of its ``k`` samples.

    One prefill of the distinct (left-padded) prompts, their key/value cache gathered to the
    ``P * k`` rows, then one cached forward per new token with explicit positions,
    :func:`filter_logits` and ``torch.multinomial``, until every row has produced EOS or
    ``max_new_tokens``. The distribution is ``generate``'s (greedy outputs are identical, see
    the tests); the prefill costs ``P`` rows instead of ``P * k``.

    With ``torch_compile`` ``decode`` or ``all`` the decoding step runs ``torch.compile``-d over
    a static key/value cache (:class:`DecodeCache`): every step then has the same shapes, so it
    compiles once per (rows, cache length) and never again. The prefill stays eager.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu", config=None) -> None:
        super().__init__(model, tokenizer, device=device, config=config)
        self.static = DecodeCache() if config is not None and config.torch_compile in ("decode", "all") else None

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams) -> Generation:
        from .kv_cache import new_cache, with_cache
        from .logprobs import position_ids_from_mask

        tok = self.tokenizer
        ids, attn = left_pad(prompt_ids, tok.pad_token_id)
        ids, attn = ids.to(self.device), attn.to(self.device)
        rows = torch.arange(len(prompt_ids), device=self.device).repeat_interleave(samples_per_prompt)
        eos = torch.tensor([tok.eos_token_id] if isinstance(tok.eos_token_id, int) else list(tok.eos_token_id), device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            positions = position_ids_from_mask(attn)
            cache = new_cache() if self.static is not None else new_cache(reserve=ids.shape[1] + params.max_new_tokens)
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=1, **with_cache(self.model, cache))
            cache.batch_select_indices(rows)
            logits, attn, position = out.logits[rows, -1], attn[rows], positions[rows, -1:] + 1
            step_fn: Callable[..., Any] = self.model
            if self.static is not None:  # decode over a fixed-size cache: one shape for every step
                step_fn, cache, attn = self.static.prepare(self.model, cache, attn, params.max_new_tokens)
            finished = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
            new_tokens, logprobs = [], []
            for step in range(params.max_new_tokens):
                if params.greedy:
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    token = logits.argmax(-1)
                else:
                    z = filter_logits(logits, params.temperature, params.top_k, params.top_p)
                    token = torch.multinomial(torch.softmax(z, dim=-1), 1).squeeze(-1)
                    logp = torch.log_softmax(z, dim=-1)
                logprobs.append(logp.gather(-1, token[:, None]).squeeze(-1))
                token = token.masked_fill(finished, tok.pad_token_id)
                new_tokens.append(token)
                finished |= torch.isin(token, eos)
                if bool(finished.all()) or step + 1 == params.max_new_tokens:
                    break
                if self.static is None:
                    attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
                out = step_fn(input_ids=token[:, None], attention_mask=attn, position_ids=position, **with_cache(self.model, cache))
                logits, position = out.logits[:, -1], position + 1
        finally:
            self.model.train(was_training)
        responses, truncated = split_responses(torch.stack(new_tokens, 1).cpu(), tok.eos_token_id, params.max_new_tokens)
        sampled = torch.stack(logprobs, 1).cpu()
        return Generation([list(prompt_ids[int(r)]) for r in rows], responses, truncated, [sampled[i, : len(r)].tolist() for i, r in enumerate(responses)])


class DecodeCache:
    """Static key/value caches and the compiled decoding step of :class:`SharedPromptSampler`.

    A :class:`transformers.StaticCache` holds ``L`` positions for ``N`` rows, ``L`` the prompt
    width plus ``max_new_tokens`` rounded up to a multiple of ``bucket``, so that rollouts whose
    prompts differ a little in width reuse one cache and one compiled graph. The prefill's
    dynamic cache is copied into positions ``0..width-1``; each decoding step writes the next
    position, and attends to all ``L`` under the causal mask (the positions not written yet
    are in the future of every query, so they are masked out: the numbers are the dynamic
    cache's). The attention mask is the prompt's padding mask, then ones, ``(N, L)``.
    """

    def __init__(self, bucket: int = 64, keep: int = 4) -> None:
        self.bucket, self.keep = bucket, keep
        self.caches: dict[tuple[int, int], Any] = {}
        self.model: Optional[torch.nn.Module] = None
        self.step: Optional[Callable[..., Any]] = None

    def prepare(self, model: torch.nn.Module, prefilled: Any, attn: Tensor, max_new_tokens: int) -> tuple[Callable[..., Any], Any, Tensor]:
        """The compiled step, a static cache holding ``prefilled``'s ``(N, heads, width, d)``
        keys and values, and the ``(N, L)`` attention mask."""
        from transformers import StaticCache

        if model is not self.model:  # a new policy object: compile anew (sync_weights keeps the object)
            self.model, self.step, self.caches = model, torch.compile(model, dynamic=False), {}
        rows, width = attn.shape
        length = -(-(width + max_new_tokens) // self.bucket) * self.bucket
        cache = self.caches.get((rows, length))
        if cache is None:
            if len(self.caches) >= self.keep:
                self.caches.clear()
            cache = StaticCache(config=cast(Any, model).config, max_cache_len=length)
            if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
                from ..config import ConfigError

                raise ConfigError("torch_compile=decode needs full-attention layers; this model has sliding-window layers: use torch_compile=update or off")
            self.caches[(rows, length)] = cache
        else:
            cache.reset()
        for i, layer in enumerate(prefilled.layers):
            cast(Any, cache.layers[i]).update(layer.keys, layer.values)
        mask = torch.ones(rows, length, dtype=attn.dtype, device=attn.device)
        mask[:, :width] = attn
        assert self.step is not None
        return self.step, cache, mask


def _vllm_engine(model: torch.nn.Module, tokenizer, *, device, config=None) -> GenerationEngine:
    from .vllm_engine import VLLMEngine  # imports vLLM only when asked for

    return VLLMEngine(model, tokenizer, device=device, config=config)


ENGINES: dict[str, Callable[..., GenerationEngine]] = {"hf": SharedPromptSampler, "hf_generate": HFGenerationEngine, "vllm": _vllm_engine}


def register_engine(name: str, factory: Callable[..., GenerationEngine]) -> None:
    """Register an engine factory ``factory(model, tokenizer, device=..., config=...)`` under
    ``name`` (``config`` is the trainer's :class:`~reinforcepp.lm.config.LMConfig`)."""
    ENGINES[name] = factory


def make_engine(name: str, model: torch.nn.Module, tokenizer, device, config=None) -> GenerationEngine:
    if name not in ENGINES:
        raise ValueError(f"unknown generation engine {name!r}; valid: {', '.join(ENGINES)}")
    return ENGINES[name](model, tokenizer, device=device, config=config)
