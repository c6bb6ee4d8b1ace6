"""Supervised fine-tuning (SFT): the warm start before RL, on ``prompt`` / ``completion`` pairs.

The loss is the token-mean negative log-likelihood of the completion tokens (and EOS), with
the prompt masked out: ``L = -sum_{i,t} m[i,t] log p(y_{i,t}) / sum m``, the same
``token-mean`` aggregation the RL loss uses.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Literal, Optional, Sequence

import torch

from ..config import Config, ConfigError, option
from ..core import aggregate
from .batch import collate
from .logprobs import response_logprobs

# (fewer parameters than this, lr): the default learning rate by model size, smallest first
SFT_LR_BY_SIZE: tuple[tuple[float, float], ...] = ((10e6, 1e-3), (200e6, 1e-4), (float("inf"), 2e-5))


def default_sft_lr(n_params: int) -> float:
    """The warm start's default learning rate for a model of ``n_params`` parameters:
    1e-3 below 10M (the tiny models of the examples: 1e-5 barely moves them), 1e-4 below 200M
    (GPT-2 small), 2e-5 above (TRL's ``SFTConfig`` default, for 0.5B models and up)."""
    return next(lr for limit, lr in SFT_LR_BY_SIZE if n_params < limit)


@dataclasses.dataclass
class SFTConfig(Config):
    """``reinforcepp sft``: supervised warm start on prompt/completion pairs."""

    model: Optional[str] = option(None, "model to fine-tune: a Hugging Face hub name or local path (required)")
    data: Optional[str] = option(None, "pairs: .jsonl, .parquet, a save_to_disk directory or a hub dataset name, with prompt and completion columns (required)")
    output_dir: Optional[str] = option(None, "where the fine-tuned model and its tokenizer are saved, a Hugging Face model directory (required)")
    tokenizer: Optional[str] = option(None, "tokenizer name or path (default: the model's)")
    prompt_column: str = option("prompt", "column holding the prompt: a string or a list of chat messages")
    completion_column: str = option("completion", "column holding the completion the model learns to produce (EOS is appended)")
    use_chat_template: bool = option(True, "apply the tokenizer's chat template to prompts when it has one")
    steps: int = option(200, "optimizer steps, each on batch_size pairs drawn at random")
    batch_size: int = option(16, "pairs per optimizer step")
    lr: Optional[float] = option(None, "AdamW learning rate; None = by model size: 1e-3 below 10M parameters, 1e-4 below 200M, 2e-5 above")
    weight_decay: float = option(0.0, "AdamW weight decay")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "parameter dtype; auto = float32 on CPU, bfloat16 on a GPU that supports it")
    device: str = option("auto", "torch device; auto = cuda if available, else cpu")
    torch_threads: int = option(0, "CPU threads for torch; 0 = one per physical core (as in train)")
    trust_remote_code: bool = option(False, "allow model repositories to run their own code")
    seed: int = option(0, "seed of the batch order")

    def validate(self) -> None:
        super().validate()
        missing = [k for k in ("model", "data", "output_dir") if getattr(self, k) is None]
        if missing:
            raise ConfigError(f"sft needs {', '.join(k + '=...' for k in missing)} (usage: reinforcepp sft model=PATH data=pairs.jsonl output_dir=OUT)")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


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
    return sft_on_ids(model, tokenizer.pad_token_id, p_ids, c_ids, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, on_step=on_step)


def sft_on_ids(
    model: torch.nn.Module,
    pad_token_id: int,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    *,
    response_masks: Optional[Sequence[list[int]]] = None,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> list[float]:
    """The loop of :func:`sft_train` on token ids: ``steps`` AdamW steps on random mini-batches
    (linear warmup over the first 5% of steps, then constant), loss
    ``-sum m log p(y) / sum m`` with ``m`` the response mask (``response_masks`` when given:
    0 on tokens that are not the model's, such as a multi-turn episode's observations)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses = []
    for step in range(steps):
        idx = [rng.randrange(len(prompt_ids)) for _ in range(batch_size)]
        masks = [response_masks[i] for i in idx] if response_masks is not None else None
        batch = collate([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], pad_token_id, response_masks=masks)
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
