"""Supervised warm start on demonstrated multi-turn episodes.

Same loss as :func:`reinforcepp.lm.sft.sft_train` (token-mean negative log-likelihood), over the
model's own tokens only: ``L = -sum_{i,t} m[i,t] log p(y_{i,t}) / sum m`` with ``m`` the
episode's response mask (0 on observations and padding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..lm.sft import sft_on_ids


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
    # torch's AdamW default weight decay (0.01), as this warm start has always used
    return sft_on_ids(model, pad_token_id, prompt_ids, response_ids, response_masks=response_masks, steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.01, seed=seed, on_step=on_step)


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
