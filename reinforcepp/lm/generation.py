"""Generation engines: the trainer asks an engine for samples and knows nothing else about it.

An engine implements :class:`GenerationEngine`. Two ship, both sampling from the policy being
trained (KV cache, left-padded prompts, temperature / top-p / top-k, stop at EOS, truncation
flagged): ``hf`` (:class:`SharedPromptSampler`, the default), a decoding loop over the model's
cached forward that runs each prompt once for all its samples, and ``hf_generate``
(:class:`HFGenerationEngine`), ``transformers``' own ``generate``. A vLLM engine plugs in through
the same interface and :func:`register_engine`, without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, cast

import torch
from torch import Tensor

from .batch import left_pad


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
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    truncated: Tensor


class GenerationEngine(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams) -> Generation: ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (a no-op when it shares them)."""
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

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

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
            out = cast(Any, self.model).generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), generation_config=gen_config)
        finally:
            self.model.train(was_training)
        responses, truncated = split_responses(out[:, width:].cpu(), tok.eos_token_id, params.max_new_tokens)
        prompts = [list(p) for p in prompt_ids for _ in range(samples_per_prompt)]
        return Generation(prompts, responses, truncated)


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
    """

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams) -> Generation:
        from transformers import DynamicCache

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
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            cache.batch_select_indices(rows)
            logits, attn, position = out.logits[rows, -1], attn[rows], positions[rows, -1:] + 1
            finished = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
            new_tokens = []
            for step in range(params.max_new_tokens):
                if params.greedy:
                    token = logits.argmax(-1)
                else:
                    probs = torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
                    token = torch.multinomial(probs, 1).squeeze(-1)
                token = token.masked_fill(finished, tok.pad_token_id)
                new_tokens.append(token)
                finished |= torch.isin(token, eos)
                if bool(finished.all()) or step + 1 == params.max_new_tokens:
                    break
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
                out = self.model(input_ids=token[:, None], attention_mask=attn, position_ids=position, past_key_values=cache, use_cache=True)
                logits, position = out.logits[:, -1], position + 1
        finally:
            self.model.train(was_training)
        responses, truncated = split_responses(torch.stack(new_tokens, 1).cpu(), tok.eos_token_id, params.max_new_tokens)
        return Generation([list(prompt_ids[int(r)]) for r in rows], responses, truncated)


ENGINES: dict[str, Callable[..., GenerationEngine]] = {"hf": SharedPromptSampler, "hf_generate": HFGenerationEngine}


def register_engine(name: str, factory: Callable[..., GenerationEngine]) -> None:
    """Register an engine factory ``factory(model, tokenizer, device=...)`` under ``name``."""
    ENGINES[name] = factory


def make_engine(name: str, model: torch.nn.Module, tokenizer, device) -> GenerationEngine:
    if name not in ENGINES:
        raise ValueError(f"unknown generation engine {name!r}; valid: {', '.join(ENGINES)}")
    return ENGINES[name](model, tokenizer, device=device)
