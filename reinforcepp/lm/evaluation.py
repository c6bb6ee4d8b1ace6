"""Held-out evaluation: greedy reward and accuracy, sampled reward, pass@k.

A response passes when its total reward is >= 1 (exact match for the built-in tasks). Sampling
uses its own seeded RNG (``seed + 7919 * step``), so evaluating never changes the training run.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..agents.rollout import episode_metrics
from ..core import pass_at_k
from ..run.timer import PhaseTimer
from .config import LMConfig
from .models import context_length
from .rollout import RolloutSampler


def held_out_rows(data: Any, max_prompts: int) -> list[dict]:
    return [data[i] for i in range(min(len(data), max_prompts))]


@torch.no_grad()
def evaluate(sampler: RolloutSampler, rows: list[dict], config: LMConfig, step: int,
             timer: PhaseTimer) -> tuple[dict[str, float], bool]:
    """Metrics ``eval/*`` of ``rows``: greedy accuracy (``eval/accuracy``, the fraction of greedy
    answers that pass) and mean reward, and with ``eval_samples`` samples at ``eval_temperature`` the
    sampled mean reward, ``eval/any_correct_of_n`` and the unbiased ``eval/pass@k`` (Chen et
    al. 2021) for ``k = 1, 2, 4, ... < n``. Also returns whether every reward was 0 or 1."""
    n = config.eval_samples
    with timer("eval"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 7919 * step)
        inner = PhaseTimer()  # evaluation time is counted once, as time/eval
        greedy_gen, _, _, _, greedy = sampler.generate_and_score(rows, 1, sampler.sampling(greedy=True), step, inner)
        sampling = sampler.sampling(temperature=config.eval_temperature)
        sampled = sampler.generate_and_score(rows, n, sampling, step, inner)[-1]
    passed = (sampled.rewards >= 1.0).view(-1, n)
    metrics = {
        "eval/reward_mean": float(greedy.rewards.mean()),
        "eval/sampled_reward_mean": float(sampled.rewards.mean()),
        "eval/accuracy": float((greedy.rewards >= 1.0).float().mean()),
        f"eval/any_correct_of_{n}": float(passed.any(dim=1).float().mean()),
        **{f"eval/{key[4:]}": v for key, v in episode_metrics(greedy_gen).items()
           if key in ("env/tool_call_rate", "env/turns")},
    }
    correct = passed.sum(dim=1)
    for k in sorted({1, *(2**j for j in range(1, n.bit_length()) if 2**j < n)}):
        if k < n or n == 1:
            metrics[f"eval/pass@{k}"] = float(pass_at_k(n, correct, k).mean())
    every = torch.cat([greedy.rewards, sampled.rewards])
    return metrics, bool(((every == 0) | (every == 1)).all())


def fitting_max_new_tokens(sampler: RolloutSampler, rows: list[dict],
                           prompt_column: str) -> Optional[tuple[int, int, int]]:
    """``(fit, context, longest)``: the largest ``max_new_tokens`` that the policy's context of
    ``context`` tokens holds after the longest of ``rows``' rendered prompts (``longest`` tokens);
    None when the model does not state its context."""
    context = context_length(sampler.policy)
    if context is None or not rows:
        return None
    longest = max(len(sampler.tokenizer(sampler.render(row[prompt_column]), add_special_tokens=False)["input_ids"])
                  for row in rows)
    return context - longest, context, longest
