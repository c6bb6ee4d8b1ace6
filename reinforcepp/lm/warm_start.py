"""The built-in tasks' supervised warm start (``sft_steps`` steps before RL).

Single-turn tasks fine-tune on each training row's ``demonstration`` (:func:`~.sft.sft_train`).
Multi-turn tasks play each row's demonstration through a fresh environment
(:func:`reinforcepp.agents.task.demonstration_episode`) and fine-tune on the model's own tokens
only: ``L = -sum_{i,t} m[i,t] log p(y_{i,t}) / sum m`` with ``m`` the episode's response mask
(0 on observations and padding), the same token-mean loss as :func:`~.sft.sft_on_ids`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from ..config import ConfigError
from ..run import Progress
from .data import has_chat_template, render_prompt
from .sft import sft_on_ids, sft_train


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
        raise ValueError(f"sft_episodes needs equally many prompts, responses and masks, "
                         f"got {len(prompt_ids)}, {len(response_ids)}, {len(response_masks)}")
    # torch's AdamW default weight decay (0.01), as this warm start has always used
    return sft_on_ids(model, pad_token_id, prompt_ids, response_ids, response_masks=response_masks, steps=steps,
                      batch_size=batch_size, lr=lr, weight_decay=0.01, seed=seed, on_step=on_step)


def warm_start(policy: torch.nn.Module, tokenizer: Any, rows: Any, config: Any, *, builtin_task: Optional[str],
               env_factory: Optional[Callable[[], Any]], progress: bool) -> None:
    """``config.sft_steps`` supervised steps on the built-in task's demonstrations in ``rows``
    (the training dataset), with a progress bar when ``progress``."""
    if builtin_task is None:
        raise ConfigError("sft_steps > 0 warm-starts on the built-in tasks only; for "
                          "your data run `reinforcepp sft` first and set sft_steps=0")
    prompts = [render_prompt(tokenizer, p, config.use_chat_template) for p in rows[config.prompt_column]]
    bar = Progress(config.sft_steps, desc="warm start (sft)", keys={"loss": "loss"}, enabled=progress)
    on_step = lambda _, loss: bar.update({"loss": loss})  # noqa: E731
    if env_factory is not None:  # multi-turn demonstrations
        warm_start_episodes(policy, tokenizer, rows, prompts, env_factory, config, on_step=on_step)
    else:
        sft_train(policy, tokenizer, prompts, list(rows["demonstration"]), steps=config.sft_steps,
                  batch_size=config.sft_batch_size, lr=config.sft_lr, seed=config.seed, on_step=on_step)
    bar.close()


def warm_start_episodes(policy: torch.nn.Module, tokenizer: Any, rows: Any, prompts: Sequence[str],
                        env_factory: Callable[[], Any], config: Any,
                        on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """The built-in multi-turn task's warm start: each training row's demonstration played
    through a fresh environment, then :func:`sft_episodes` for ``config.sft_steps`` steps."""
    from ..agents.rollout import ChatFormat, PlainFormat
    from ..agents.task import demonstration_episode, demonstration_turns

    tok = tokenizer
    fmt = ChatFormat(tok) if config.use_chat_template and has_chat_template(tok) else PlainFormat(tok)
    rows = [rows[i] for i in range(len(rows))]
    prompt_ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    episodes = [demonstration_episode(env_factory(), row, ids, demonstration_turns(row), tok, fmt.observation_ids)
                for row, ids in zip(rows, prompt_ids)]
    return sft_episodes(policy, tok.pad_token_id, prompt_ids, [e[0] for e in episodes], [e[1] for e in episodes],
                        steps=config.sft_steps, batch_size=config.sft_batch_size, lr=config.sft_lr, seed=config.seed,
                        on_step=on_step)
