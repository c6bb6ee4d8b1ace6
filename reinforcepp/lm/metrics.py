"""What a step logs about its rollout, the samples file, and the KL-share warning.

docs/algorithms.md, "What the metrics mean": reward mean/std/min/max and per source, the groups
whose rewards are all equal and the mean within-group std, response
length and truncation, KL to the reference and beta, advantage statistics (token- and
sample-weighted), the episode counters of multi-turn runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..agents.rollout import episode_metrics
from ..core import advantage_stats, group_reward_stats, kl_return_share, masked_mean, staleness_stats
from .experience import Experience
from .rollout import Rollout


def rollout_metrics(
    rollout: Rollout, exp: Experience, beta: float, version: int, samples_per_prompt: int, reduce: Any = None
) -> dict[str, float]:
    """This rank's rollout metrics (the trainer reduces them over ranks); ``version``: the
    policy version the update starts from (staleness is counted against it)."""
    mask = exp.response_mask
    lengths = mask.sum(1)
    r = rollout.rewards
    m: dict[str, float] = {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std(unbiased=False)),
        "reward/min": float(r.min()),
        "reward/max": float(r.max()),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": float(rollout.generation.truncated.float().mean()),
        "response/tokens": float(lengths.sum()),
        "kl/beta": float(beta),
        **advantage_stats(exp.advantages, mask),
        **rollout.counts,
        **episode_metrics(rollout.generation),
    }
    if samples_per_prompt > 1 and r.numel() % samples_per_prompt == 0:
        m.update(group_reward_stats(r, samples_per_prompt))
    for name, values in rollout.per_source.items():  # NaN where the source did not score
        m[f"reward/{name}"] = float(values.nanmean())
    if exp.kl is not None:
        m["kl/mean_token"] = float(masked_mean(exp.kl, mask))
        m["kl/mean_sequence"] = float(exp.kl.sum() / mask.shape[0])
        m["kl/return_share"] = kl_return_share(rollout.rewards, exp.kl, mask, beta)
    if exp.values is not None:
        m["critic/value_mean"] = float(masked_mean(exp.values, mask))
    if exp.teacher_logprobs is not None and exp.old_logprobs is not None:  # the reverse KL to the teacher
        diff = (exp.old_logprobs - exp.teacher_logprobs) * mask
        m["distill/reverse_kl"] = float(diff.sum() / mask.sum().clamp_min(1))
        m["distill/reverse_kl_sequence"] = float(diff.sum() / mask.shape[0])
    if exp.token_versions is not None:
        m.update(staleness_stats(exp.token_versions, mask, version, reduce))
    return m


def log_samples(path: Path, step: int, rollout: Rollout, n: int) -> None:
    """Append the first ``n`` completions of the rollout, with their rewards, to ``samples.jsonl``."""
    with path.open("a") as f:
        for i in range(min(n, len(rollout.prompts))):
            row: dict[str, Any] = {"step": step, "prompt": rollout.prompts[i], "completion": rollout.completions[i],
                                   "reward": float(rollout.rewards[i])}
            row.update({f"reward/{name}": float(v[i]) for name, v in rollout.per_source.items()})
            if rollout.generation.episodes is not None:
                row["transcript"] = rollout.generation.episodes.transcripts[i]
            f.write(json.dumps(row) + "\n")


class KLShareWarning:
    """Once per run: the KL penalty makes up more of the return than the task reward."""

    def __init__(self, kl_coef: float) -> None:
        self.kl_coef = kl_coef
        self.warned = False

    def __call__(self, step: int, share: float) -> None:
        if share <= 0.5 or self.warned:
            return
        self.warned = True
        print(f"reinforcepp: warning: at step {step} the KL penalty is {share:.0%} of the return "
              "(kl/return_share), more than the task reward: the policy gains more by staying near the "
              f"reference than by solving the task. Lower kl_coef (now {self.kl_coef}), or move the KL "
              "out of the reward (kl_placement=loss or none); see docs/lm.md, 'Choosing the KL'.",
              file=sys.stderr)
