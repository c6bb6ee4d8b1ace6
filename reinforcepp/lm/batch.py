"""Tensor layout of a language-model batch: ``[prompt (left-padded) | response (right-padded)]``.

Every row's response starts at the same column ``P``, so response tensors are plain ``(N, T)``
slices and the core's ``response_mask`` is a prefix mask per row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..engines import left_pad


@dataclass
class PromptResponseBatch:
    input_ids: Tensor
    """``(N, P + T)`` long."""
    attention_mask: Tensor
    """``(N, P + T)`` long, 1 on real prompt and response tokens."""
    response_mask: Tensor
    """``(N, T)`` float, 1 on real response tokens (up to and including EOS); in multi-turn
    episodes 1 on the model's tokens only (0 on observations, which are in ``attention_mask``)."""

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    def select(self, index: Tensor | slice) -> "PromptResponseBatch":
        return PromptResponseBatch(*(getattr(self, f.name)[index] for f in fields(self)))


def collate(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    response_length: Optional[int] = None,
    response_masks: Optional[Sequence[Sequence[int]]] = None,
) -> PromptResponseBatch:
    """Left-pad prompts, right-pad responses, concatenate.

    Args:
        prompt_ids: ``N`` token lists.
        response_ids: ``N`` token lists (each non-empty).
        response_length: pad responses to this length (default: the longest).
        response_masks: ``N`` 0/1 lists as long as the responses (multi-turn episodes: 0 on the
            environment's tokens, which stay in ``attention_mask``); ``None`` = all 1.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    t = response_length or max(len(y) for y in response_ids)
    prompt, prompt_attn = left_pad(prompt_ids, pad_token_id)
    response = torch.full((len(response_ids), t), pad_token_id, dtype=torch.long)
    response_attn = torch.zeros_like(response)
    for i, y in enumerate(response_ids):
        if not y:
            raise ValueError(f"response {i} is empty")
        y = list(y)[:t]
        response[i, : len(y)] = torch.tensor(y, dtype=torch.long)
        response_attn[i, : len(y)] = 1
    response_mask = response_attn.float()
    if response_masks is not None:
        for i, (y, m) in enumerate(zip(response_ids, response_masks)):
            if len(m) != len(y):
                raise ValueError(f"response {i}: {len(m)} mask values for {len(y)} tokens")
            response_mask[i, : min(len(m), t)] = torch.tensor(list(m)[:t], dtype=torch.float32)
    return PromptResponseBatch(torch.cat([prompt, response], 1), torch.cat([prompt_attn, response_attn], 1),
                               response_mask)
