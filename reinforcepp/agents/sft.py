"""Supervised warm start on demonstrated multi-turn episodes.

Same loss as :func:`reinforcepp.lm.sft.sft_train` (token-mean negative log-likelihood), over the
model's own tokens only: ``L = -sum_{i,t} m[i,t] log p(y_{i,t}) / sum m`` with ``m`` the
episode's response mask (0 on observations and padding).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core import aggregate
from ..lm.batch import collate
from ..lm.logprobs import response_logprobs


def sft_episodes(
    model: torch.nn.Module,
    pad_token_id: int,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    response_masks: Sequence[list[int]],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """``steps`` AdamW steps on random mini-batches of episodes (linear warmup over the first
    5% of steps, then constant). Returns the loss per step."""
    if not prompt_ids or not len(prompt_ids) == len(response_ids) == len(response_masks):
        raise ValueError(f"sft_episodes needs equally many prompts, responses and masks, got {len(prompt_ids)}, {len(response_ids)}, {len(response_masks)}")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses = []
    for step in range(steps):
        idx = [rng.randrange(len(prompt_ids)) for _ in range(batch_size)]
        batch = collate([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], pad_token_id, response_masks=[response_masks[i] for i in idx])
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


def warm_start_episodes(trainer: Any, prompts: Sequence[str], on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """The built-in multi-turn task's warm start: each training row's demonstration played
    through a fresh environment (:func:`reinforcepp.agents.task.demonstration_episode`), then
    :func:`sft_episodes` for ``config.sft_steps`` steps."""
    from ..lm.data import has_chat_template
    from .rollout import ChatFormat, PlainFormat
    from .task import demonstration_episode, demonstration_turns

    cfg = trainer.config
    tok = trainer.tokenizer
    fmt = ChatFormat(tok) if cfg.use_chat_template and has_chat_template(tok) else PlainFormat(tok)
    rows = [trainer.train_data[i] for i in range(len(trainer.train_data))]
    prompt_ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    episodes = [demonstration_episode(trainer.env_factory(), row, ids, demonstration_turns(row), tok, fmt.observation_ids)
                for row, ids in zip(rows, prompt_ids)]
    return sft_episodes(trainer.policy, tok.pad_token_id, prompt_ids, [e[0] for e in episodes], [e[1] for e in episodes],
                        steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=cfg.seed, on_step=on_step)
