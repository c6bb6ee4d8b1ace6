"""The Hugging Face engines: sampling with the policy being trained, in the trainer's process.

Both share the training model itself, so their weights are always the policy's (``sync_weights``
only records the version):

* ``hf`` (:class:`SharedPromptSampler`, the default): a decoding loop over the model's cached
  forward that runs each prompt once for all its samples (KV cache reserved ahead,
  :mod:`.kv_cache`; with ``torch_compile`` ``decode`` or ``all`` a compiled step over a static
  cache, :class:`DecodeCache`);
* ``hf_generate`` (:class:`HFGenerationEngine`): ``transformers``' own ``generate``.

Both sample with temperature / top-p / top-k, stop at EOS, flag truncation, and return the
log-probs they sampled each token with (``sampler_logprobs``, under the distribution actually
sampled from: temperature, top-k and top-p applied).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, cast

import torch
from torch import Tensor

from .base import Generation, SamplingParams, WeightProvider, left_pad, position_ids_from_mask, split_responses
from .registry import register_engine


class HFGenerationEngine:
    """Sampling with ``model.generate`` on the training model itself (weights always in sync)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu", config=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.weight_version = 0

    def sync_weights(
        self, model: torch.nn.Module, weights: Optional[WeightProvider] = None, *, version: int = 0
    ) -> None:
        self.model = model  # the engine samples from the training model itself: nothing to copy
        self.weight_version = version

    def sleep(self) -> None:
        pass

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams
    ) -> Generation:
        from transformers import GenerationConfig

        tok = self.tokenizer
        ids, attn = left_pad(prompt_ids, tok.pad_token_id)
        width = ids.shape[1]
        # Sampling values are explicit: None would fall back to transformers' defaults (top_k=50).
        sampling = {} if params.greedy else dict(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                                 top_k=params.top_k)
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
            out = cast(Any, self.model).generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                                 generation_config=gen_config,
                                                 output_scores=True, return_dict_in_generate=True)
        finally:
            self.model.train(was_training)
        new = out.sequences[:, width:]
        # scores are the processed logits (temperature, top-k, top-p applied): the sampled distribution
        logprobs = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                                for t, s in enumerate(out.scores)], 1)
        responses, truncated = split_responses(new.cpu(), tok.eos_token_id, params.max_new_tokens)
        prompts = [list(p) for p in prompt_ids for _ in range(samples_per_prompt)]
        sampled = [logprobs[i, : len(r)].tolist() for i, r in enumerate(responses)]
        return Generation(prompts, responses, truncated, sampled).with_version(self.weight_version)


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
    ``max_new_tokens``. With a seed, the ``k`` rows of prompt ``i`` draw from a generator of
    their own (:meth:`SamplingParams.seeds_for`): the samples of a prompt do not depend on the
    other prompts of the call. The distribution is ``generate``'s (greedy outputs are identical, see
    the tests); the prefill costs ``P`` rows instead of ``P * k``.

    With ``torch_compile`` ``decode`` or ``all`` the decoding step runs ``torch.compile``-d over
    a static key/value cache (:class:`DecodeCache`): every step then has the same shapes, so it
    compiles once per (rows, cache length) and never again. The prefill stays eager.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu", config=None) -> None:
        super().__init__(model, tokenizer, device=device, config=config)
        self.static = DecodeCache() if config is not None and config.torch_compile in ("decode", "all") else None

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams
    ) -> Generation:
        from .kv_cache import new_cache, with_cache

        tok = self.tokenizer
        ids, attn = left_pad(prompt_ids, tok.pad_token_id)
        ids, attn = ids.to(self.device), attn.to(self.device)
        rows = torch.arange(len(prompt_ids), device=self.device).repeat_interleave(samples_per_prompt)
        eos_ids = [tok.eos_token_id] if isinstance(tok.eos_token_id, int) else list(tok.eos_token_id)
        eos = torch.tensor(eos_ids, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            positions = position_ids_from_mask(attn)
            cache = new_cache() if self.static is not None else new_cache(reserve=ids.shape[1] + params.max_new_tokens)
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=1,
                             **with_cache(self.model, cache))
            cache.batch_select_indices(rows)
            logits, attn, position = out.logits[rows, -1], attn[rows], positions[rows, -1:] + 1
            step_fn: Callable[..., Any] = self.model
            if self.static is not None:  # decode over a fixed-size cache: one shape for every step
                step_fn, cache, attn = self.static.prepare(self.model, cache, attn, params.max_new_tokens)
            finished = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
            seeds = params.seeds_for(len(prompt_ids))
            draws = None if seeds is None else [torch.Generator(self.device).manual_seed(s) for s in seeds]
            k = samples_per_prompt
            new_tokens, logprobs = [], []
            for step in range(params.max_new_tokens):
                if params.greedy:
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    token = logits.argmax(-1)
                else:
                    z = filter_logits(logits, params.temperature, params.top_k, params.top_p)
                    probs = torch.softmax(z, dim=-1)
                    if draws is None:
                        token = torch.multinomial(probs, 1).squeeze(-1)
                    else:  # prompt i's k rows draw from prompt i's own generator
                        drawn = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs.split(k), draws)]
                        token = torch.cat(drawn).squeeze(-1)
                    logp = torch.log_softmax(z, dim=-1)
                logprobs.append(logp.gather(-1, token[:, None]).squeeze(-1))
                token = token.masked_fill(finished, tok.pad_token_id)
                new_tokens.append(token)
                finished |= torch.isin(token, eos)
                if bool(finished.all()) or step + 1 == params.max_new_tokens:
                    break
                if self.static is None:
                    attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
                out = step_fn(input_ids=token[:, None], attention_mask=attn, position_ids=position,
                              **with_cache(self.model, cache))
                logits, position = out.logits[:, -1], position + 1
        finally:
            self.model.train(was_training)
        responses, truncated = split_responses(torch.stack(new_tokens, 1).cpu(), tok.eos_token_id,
                                               params.max_new_tokens)
        sampled = torch.stack(logprobs, 1).cpu()
        prompts = [list(prompt_ids[int(r)]) for r in rows]
        lps = [sampled[i, : len(r)].tolist() for i, r in enumerate(responses)]
        return Generation(prompts, responses, truncated, lps).with_version(self.weight_version)


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

    def prepare(
        self, model: torch.nn.Module, prefilled: Any, attn: Tensor, max_new_tokens: int
    ) -> tuple[Callable[..., Any], Any, Tensor]:
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

                raise ConfigError("torch_compile=decode needs full-attention layers; this model has sliding-window "
                                  "layers: use torch_compile=update or off")
            self.caches[(rows, length)] = cache
        else:
            cache.reset()
        for i, layer in enumerate(prefilled.layers):
            cast(Any, cache.layers[i]).update(layer.keys, layer.values)
        mask = torch.ones(rows, length, dtype=attn.dtype, device=attn.device)
        mask[:, :width] = attn
        assert self.step is not None
        return self.step, cache, mask


register_engine("hf", SharedPromptSampler,
                help="cached sampling loop, each prompt prefilled once for its samples (the default)")
register_engine("hf_generate", HFGenerationEngine, help="transformers' generate", seeded=False)
