"""A toy environment whose returns can be computed by hand.

Observation ``[t]`` (steps taken in the episode). Reward ``r_t = t + 1`` whatever the action.
Episodes alternate per environment instance: even-numbered episodes (0, 2, ...) never
terminate and are cut by the time limit of 4 steps (rewards 1, 2, 3, 4, truncated);
odd-numbered ones terminate after 3 steps (rewards 1, 2, 3).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

TOY_ID = "reinforcepp-test/ToyChain-v0"


class ToyChain(gym.Env):
    observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, render_mode=None) -> None:
        self.t = 0
        self.episode = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.episode += 1
        return np.array([0.0], np.float32), {}

    def step(self, action):
        reward = float(self.t + 1)
        self.t += 1
        terminated = self.episode % 2 == 1 and self.t == 3
        return np.array([float(self.t)], np.float32), reward, terminated, False, {}


if TOY_ID not in gym.registry:
    gym.register(TOY_ID, entry_point=ToyChain, max_episode_steps=4)
