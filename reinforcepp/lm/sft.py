"""Supervised fine-tuning (SFT): the warm start before RL, on ``prompt`` / ``completion`` pairs.

The loss is the token-mean negative log-likelihood of the completion tokens (and EOS), with
the prompt masked out: ``L = -sum_{i,t} m[i,t] log p(y_{i,t}) / sum m``, the same
``token-mean`` aggregation the RL loss uses.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

import torch

from ..core import aggregate
from .batch import collate
from .logprobs import response_logprobs


def encode_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt, and of each completion followed by EOS."""
    p = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in prompts]
    c = [tokenizer(y, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for y in completions]
    return p, c


def sft_train(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> list[float]:
    """Train ``model`` for ``steps`` AdamW steps on random mini-batches of the pairs (linear
    warmup over the first 5% of steps, then constant). Returns the loss per step."""
    if not prompts or len(prompts) != len(completions):
        raise ValueError(f"sft needs equally many prompts and completions, got {len(prompts)} and {len(completions)}")
    p_ids, c_ids = encode_pairs(tokenizer, prompts, completions)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses = []
    for step in range(steps):
        idx = [rng.randrange(len(p_ids)) for _ in range(batch_size)]
        batch = collate([p_ids[i] for i in idx], [c_ids[i] for i in idx], tokenizer.pad_token_id)
        logp = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_length).logprobs
        loss = aggregate(-logp, batch.response_mask, "token-mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
