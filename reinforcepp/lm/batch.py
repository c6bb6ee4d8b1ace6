"""Tensor layout of a language-model batch: ``[prompt (left-padded) | response (right-padded)]``.

Every row's response starts at the same column ``P``, so response tensors are plain ``(N, T)``
slices and the core's ``response_mask`` is a prefix mask per row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class PromptResponseBatch:
    input_ids: Tensor
    """``(N, P + T)`` long."""
    attention_mask: Tensor
    """``(N, P + T)`` long, 1 on real prompt and response tokens."""
    response_mask: Tensor
    """``(N, T)`` float, 1 on real response tokens (up to and including EOS)."""

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    def select(self, index: Tensor | slice) -> "PromptResponseBatch":
        return PromptResponseBatch(*(getattr(self, f.name)[index] for f in fields(self)))


def collate(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_token_id: int, response_length: Optional[int] = None) -> PromptResponseBatch:
    """Left-pad prompts, right-pad responses, concatenate.

    Args:
        prompt_ids: ``N`` token lists.
        response_ids: ``N`` token lists (each non-empty).
        response_length: pad responses to this length (default: the longest).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    p = max(len(x) for x in prompt_ids)
    t = response_length or max(len(y) for y in response_ids)
    n = len(prompt_ids)
    ids = torch.full((n, p + t), pad_token_id, dtype=torch.long)
    attn = torch.zeros((n, p + t), dtype=torch.long)
    for i, (x, y) in enumerate(zip(prompt_ids, response_ids)):
        if not y:
            raise ValueError(f"response {i} is empty")
        y = list(y)[:t]
        ids[i, p - len(x) : p] = torch.tensor(list(x), dtype=torch.long)
        ids[i, p : p + len(y)] = torch.tensor(y, dtype=torch.long)
        attn[i, p - len(x) : p + len(y)] = 1
    return PromptResponseBatch(ids, attn, attn[:, p:].float())
