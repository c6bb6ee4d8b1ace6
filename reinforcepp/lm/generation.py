"""Generation engines: the trainer asks an engine for samples and knows nothing else about it.

An engine implements :class:`GenerationEngine`. The default, :class:`HFGenerationEngine`, runs
``transformers`` ``generate`` on the policy being trained (KV cache, left-padded prompts,
temperature / top-p / top-k sampling, stop at EOS). A vLLM engine plugs in through the same
interface and :func:`register_engine`, without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor


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
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :] = torch.tensor(list(p))
            attn[i, width - len(p) :] = 1
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
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), generation_config=gen_config)
        finally:
            self.model.train(was_training)
        responses, truncated = split_responses(out[:, width:].cpu(), tok.eos_token_id, params.max_new_tokens)
        prompts = [list(p) for p in prompt_ids for _ in range(samples_per_prompt)]
        return Generation(prompts, responses, truncated)


ENGINES: dict[str, Callable[..., GenerationEngine]] = {"hf": HFGenerationEngine}


def register_engine(name: str, factory: Callable[..., GenerationEngine]) -> None:
    """Register an engine factory ``factory(model, tokenizer, device=...)`` under ``name``."""
    ENGINES[name] = factory


def make_engine(name: str, model: torch.nn.Module, tokenizer, device) -> GenerationEngine:
    if name not in ENGINES:
        raise ValueError(f"unknown generation engine {name!r}; valid: {', '.join(ENGINES)}")
    return ENGINES[name](model, tokenizer, device=device)
