"""Tuned settings per (environment, estimator): the ones the numbers in docs/gym.md were
measured with. ``benchmarks/gym_targets.py`` and ``reinforcepp compare --env`` both start from
them; ``key=value`` overrides win."""

from __future__ import annotations

_BOX = dict(normalize_obs=True, lr_schedule="linear")
PRESETS: dict[tuple[str, str], dict] = {
    ("CartPole-v1", "reinforce_pp"): dict(num_envs=8, steps_per_env=128, epochs=4, mini_batch_size=256, lr=1e-3,
                                          lr_schedule="linear"),
    ("CartPole-v1", "gae"): dict(num_envs=8, steps_per_env=128, epochs=4, mini_batch_size=256, lr=1e-3,
                                 lr_schedule="linear", normalize_reward=True),
    # LunarLander: the rl-zoo PPO settings (16 envs x 1024 steps, mini-batch 64, 4 epochs, ent 0.01;
    # gae: gamma 0.999, lambda 0.98) plus a linear lr decay; reinforce_pp keeps gamma 0.99 (no critic:
    # a longer horizon only adds variance) and gains from the long rollouts (few carried segments)
    ("LunarLander-v3", "reinforce_pp"): dict(num_envs=16, steps_per_env=1024, epochs=4, mini_batch_size=64, lr=3e-4,
                                             gamma=0.99, entropy_coef=0.01, lr_schedule="linear", eval_every=50_000),
    ("LunarLander-v3", "gae"): dict(num_envs=16, steps_per_env=1024, epochs=4, mini_batch_size=64, lr=3e-4,
                                    gamma=0.999, lam=0.98, entropy_coef=0.01, lr_schedule="linear", eval_every=50_000),
    ("Pendulum-v1", "reinforce_pp"): dict(num_envs=8, steps_per_env=256, epochs=10, mini_batch_size=256, lr=1e-3,
                                          gamma=0.9, **_BOX),
    ("Pendulum-v1", "gae"): dict(num_envs=8, steps_per_env=256, epochs=10, mini_batch_size=256, lr=1e-3, gamma=0.9,
                                 normalize_reward=True, **_BOX),
    ("Hopper-v5", "reinforce_pp"): dict(num_envs=8, steps_per_env=256, epochs=10, mini_batch_size=512, lr=3e-4,
                                        **_BOX, eval_every=50_000),
    ("Hopper-v5", "gae"): dict(num_envs=8, steps_per_env=256, epochs=10, mini_batch_size=512, lr=3e-4,
                               normalize_reward=True, **_BOX, eval_every=50_000),
    ("HalfCheetah-v5", "reinforce_pp"): dict(num_envs=8, steps_per_env=256, epochs=10, mini_batch_size=512, lr=3e-4,
                                             **_BOX, eval_every=50_000),
    ("HalfCheetah-v5", "gae"): dict(num_envs=8, steps_per_env=256, epochs=10, mini_batch_size=512, lr=3e-4,
                                    normalize_reward=True, **_BOX, eval_every=50_000),
}
