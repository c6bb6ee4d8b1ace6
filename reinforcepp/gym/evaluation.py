"""Deterministic evaluation of a Gymnasium policy (docs/gym.md): the mode of the policy (argmax /
Gaussian mean) over fresh, seeded episodes, observation statistics frozen, the first episode
optionally recorded as a video.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch

from .policy import ObsNormalizer, Policy


def evaluate_policy(
    policy: Policy,
    obs_norm: ObsNormalizer,
    env_id: str,
    env_kwargs: dict[str, Any],
    episodes: int,
    seed: int,
    *,
    action_bounds: Optional[tuple[Any, Any]] = None,
    video_dir: Optional[Path] = None,
    video_prefix: str = "eval",
) -> dict[str, float]:
    """``episodes`` episodes of a fresh ``env_id`` seeded ``seed, seed + 1, ...``, each action the
    policy's mode (clipped to ``action_bounds``, ``(low, high)``, for a Box action space). With
    ``video_dir``, the first episode is recorded there, its files named ``video_prefix...``."""
    returns, lengths = [], []
    for i in range(episodes):
        env = eval_env(env_id, env_kwargs, video_dir if i == 0 else None, video_prefix)
        try:
            obs, _ = env.reset(seed=seed + i)
            total, steps, done = 0.0, 0, False
            while not done:
                with torch.inference_mode():
                    x = torch.from_numpy(obs_norm(np.asarray(obs)[None]))
                    action = policy.act(x, deterministic=True)[0][0].numpy()
                if action_bounds is not None:
                    action = np.clip(action, *action_bounds)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                steps += 1
                done = terminated or truncated
        finally:
            env.close()
        returns.append(total)
        lengths.append(steps)
    r = np.array(returns)
    return {"eval/return_mean": float(r.mean()), "eval/return_std": float(r.std()), "eval/return_min": float(r.min()),
            "eval/length_mean": float(np.mean(lengths)), "eval/episodes": float(episodes)}


def eval_env(env_id: str, env_kwargs: dict[str, Any], video_dir: Optional[Path], video_prefix: str) -> gym.Env:
    """A fresh ``env_id``; with ``video_dir``, wrapped to record every episode there (the render extra)."""
    if video_dir is None:
        return gym.make(env_id, render_mode=None, **env_kwargs)
    try:
        import moviepy  # noqa: F401
    except ImportError:
        raise ImportError("video=true needs the render extra: pip install 'reinforcepp[render]'") from None
    env = gym.make(env_id, render_mode="rgb_array", **env_kwargs)
    return gym.wrappers.RecordVideo(env, str(video_dir), episode_trigger=lambda _: True, name_prefix=video_prefix,
                                   disable_logger=True)
