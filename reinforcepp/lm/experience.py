"""Experience: one rollout turned into everything the update needs.

The experience part of the training step (docs/lm.md, "The training step and its batch sizes"):
forward passes without gradient (``old_logprobs``, ``ref_logprobs``, ``values``), then shaped
rewards, returns and advantages on the whole batch (docs/algorithms.md, "The pipeline, in order").
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor

from .batch import PromptResponseBatch


@dataclass
class Experience:
    """``N`` responses; every tensor is ``(N, T)`` or ``(N,)``."""

    batch: PromptResponseBatch
    rewards: Tensor
    """``(N,)`` scalar reward ``R_i`` after length penalties (before baseline and clip)."""
    advantages: Tensor
    returns: Tensor
    old_logprobs: Optional[Tensor] = None
    """``None`` when the update is exactly on-policy: the update's own log-probs are used."""
    ref_logprobs: Optional[Tensor] = None
    values: Optional[Tensor] = None
    kl: Optional[Tensor] = None
    """``(N, T)`` KL(old || ref) per token when the KL goes in the reward (logged)."""
    loss_mask: Optional[Tensor] = None
    """``(N, T)`` the tokens that enter the loss when they are not all real response tokens
    (``mask_truncated_completions``); ``None``: the response mask."""
    sampler_logprobs: Optional[Tensor] = None
    """``(N, T)`` log-probs the engine sampled the tokens with (``None`` if it does not report them)."""

    def __len__(self) -> int:
        return self.rewards.shape[0]

    @property
    def response_mask(self) -> Tensor:
        return self.batch.response_mask

    @property
    def loss_mask_or_response_mask(self) -> Tensor:
        return self.response_mask if self.loss_mask is None else self.loss_mask

    def select(self, index: Tensor) -> "Experience":
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value.select(index) if isinstance(value, PromptResponseBatch) else (None if value is None else value[index])
        return Experience(**picked)


@torch.no_grad()
def batched_forward(fn, batch: PromptResponseBatch, micro_batch_size: int, device: torch.device) -> Tensor:
    """Apply ``fn(input_ids, attention_mask, response_length) -> (b, T)`` micro-batch by
    micro-batch and concatenate (on the CPU)."""
    outs = []
    for start in range(0, batch.input_ids.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        outs.append(fn(batch.input_ids[sl].to(device), batch.attention_mask[sl].to(device), batch.response_length).float().cpu())
    return torch.cat(outs, 0)
