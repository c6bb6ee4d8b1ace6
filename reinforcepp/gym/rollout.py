"""Rollouts from vectorised Gymnasium environments, laid out as the core expects.

The core sees a batch of *responses*; here a response is an episode segment and its tokens are
time steps. :class:`Collector` runs ``steps_per_env`` steps in each of the ``num_envs``
environments, then cuts every environment's stream of steps into segments at episode ends and
pads them into rows of ``(N, T)`` tensors: ``step_rewards``, ``response_mask``, ``values`` and
``last_values`` (:class:`RolloutBatch`, :meth:`RolloutBatch.advantage_inputs`). Per-step data
that the loss needs (observations, actions, log-probs) stay flat, in the row-major order of the
real steps of that layout, so ``x_pad[response_mask.bool()]`` lines up with them.

How a segment ends decides its bootstrap value (``docs/gym.md``, "Episode ends"):

* terminated: terminal, ``last_value = 0``;
* truncated by the time limit: with a critic (``gae``), ``last_value = V(s_T)`` of the final
  observation; critic-free, treated as terminal (``time_limit="terminal"``) or dropped from the
  loss (``time_limit="drop"``);
* cut by the end of the rollout (the episode goes on): with a critic, ``last_value = V(s)`` of
  the next observation (PPO); critic-free, the segment is *carried over* and trained on, once,
  in the rollout where its episode ends (its ``old_logprobs`` stay those of the policy that took
  the actions, so the clipped ratio corrects for the policy having moved since).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from torch import Tensor, nn

from ..core import AdvantageInputs
from .policy import ObsNormalizer, Policy, RewardNormalizer

EndKind = Literal["terminated", "truncated", "cut"]


def make_vector_env(
    env_id: str, num_envs: int, vectorization: str = "sync", env_kwargs: Optional[dict] = None
) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``env_id`` with ``render_mode=None``, same-step autoreset (the
    observation returned with ``terminated | truncated`` is already the next episode's first one;
    the last observation of the finished episode is in ``info["final_obs"]``), and ``copy=False``:
    ``step`` returns the vector env's own observation buffer, overwritten by the next ``step``
    (the collector copies it into the rollout before stepping again; a deep copy per step is
    saved)."""
    return gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode=vectorization,
        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP, "copy": False},
        render_mode=None,
        **(env_kwargs or {}),
    )


@dataclass
class Segment:
    """One row of the batch: ``length`` steps of environment ``env`` ending as ``end``."""

    env: int
    length: int
    end: EndKind
    last_value: float


@dataclass
class RolloutBatch:
    """A rollout, as rows (segments) for the core and flat steps for the loss.

    Attributes:
        obs: ``(S, obs_dim)`` policy inputs (normalised as they were when collected).
        actions: ``(S,)`` long or ``(S, d)`` float, unclipped.
        logprobs: ``(S,)`` ``old_logprobs`` under the policy that took the action.
        values: ``(S,)`` critic values at collection (zeros without a critic).
        staleness: ``(S,)`` rollouts since the step was collected (0 = this one).
        step_rewards: ``(N, T)`` training rewards (normalised if enabled), zero on padding.
        response_mask: ``(N, T)`` 1 on the real steps of each segment (a prefix).
        values_pad: ``(N, T)`` the values in the row layout, or ``None`` without a critic.
        last_values: ``(N,)`` bootstrap values (0 for terminal rows), or ``None`` when every
            row is treated as terminal.
        segments: the rows' descriptions.
        episodes: ``(raw return, length, truncated)`` of every episode that ended in this
            rollout (including ones dropped from the loss).
        env_steps: environment steps taken by this rollout.
    """

    obs: Tensor
    actions: Tensor
    logprobs: Tensor
    values: Tensor
    staleness: Tensor
    step_rewards: Tensor
    response_mask: Tensor
    values_pad: Optional[Tensor]
    last_values: Optional[Tensor]
    segments: list[Segment]
    episodes: list[tuple[float, int, bool]]
    env_steps: int

    @property
    def num_steps(self) -> int:
        """Real (trainable) steps in the batch."""
        return int(self.obs.shape[0])

    def advantage_inputs(self) -> AdvantageInputs:
        """The batch as the core's estimators take it: a response per segment, per-step rewards
        in ``step_rewards`` and zero scalar rewards, no KL (placement ``none``)."""
        n = self.response_mask.shape[0]
        return AdvantageInputs(
            rewards=torch.zeros(n),
            response_mask=self.response_mask,
            samples_per_prompt=1,
            values=self.values_pad,
            step_rewards=self.step_rewards,
            last_values=self.last_values,
        )


_FIELDS = ("obs", "actions", "logprobs", "values", "rewards", "terminated", "truncated", "final_values", "iteration")


class Collector:
    """Steps a vector env with a policy and turns the steps into :class:`RolloutBatch` es.

    Args:
        envs: a vector env made by :func:`make_vector_env` (same-step autoreset).
        policy: the policy; ``critic``: ``V(s)`` or ``None`` (critic-free).
        obs_norm, reward_norm: the running normalisers (identity when disabled).
        steps_per_env: steps per environment per rollout.
        time_limit: critic-free handling of time-limit truncation, ``"terminal"`` or ``"drop"``.
        generator: the torch generator that samples actions.
    """

    def __init__(
        self,
        envs: gym.vector.VectorEnv,
        policy: Policy,
        critic: Optional[nn.Module],
        obs_norm: ObsNormalizer,
        reward_norm: RewardNormalizer,
        steps_per_env: int,
        time_limit: str,
        generator: torch.Generator,
    ) -> None:
        self.envs, self.policy, self.critic = envs, policy, critic
        self.obs_norm, self.reward_norm = obs_norm, reward_norm
        self.steps_per_env, self.time_limit, self.generator = steps_per_env, time_limit, generator
        self.num_envs = envs.num_envs
        space = envs.single_action_space
        box = space if isinstance(space, spaces.Box) else None
        self.box = box is not None
        self.low = box.low if box is not None else None
        self.high = box.high if box is not None else None
        obs_dim = int(np.prod(envs.single_observation_space.shape or ()))
        act_shape: tuple[int, ...] = box.shape if box is not None else ()
        t, e = steps_per_env, self.num_envs
        self.buf = {
            "obs": np.zeros((t, e, obs_dim), np.float32),
            "actions": np.zeros((t, e, *act_shape), np.float32 if self.box else np.int64),
            "logprobs": np.zeros((t, e), np.float32),
            "values": np.zeros((t, e), np.float32),
            "rewards": np.zeros((t, e), np.float32),
            "terminated": np.zeros((t, e), bool),
            "truncated": np.zeros((t, e), bool),
            "final_values": np.zeros((t, e), np.float32),
            "iteration": np.zeros((t, e), np.int64),
        }
        self.pending: list[dict[str, np.ndarray]] = [self._empty(k) for k in range(e)]
        self.raw_obs: Optional[np.ndarray] = None
        self.ep_return = np.zeros(e, np.float64)
        self.ep_length = np.zeros(e, np.int64)

    def _empty(self, env: int) -> dict[str, np.ndarray]:
        return {k: v[:0, env] for k, v in self.buf.items()}

    def reset(self, seed: int) -> None:
        """Start fresh episodes in every environment (seeds ``seed, seed + 1, ...``)."""
        # vector envs take one seed per env
        self.raw_obs, _ = self.envs.reset(seed=[seed + i for i in range(self.num_envs)])  # type: ignore[arg-type]
        self.pending = [self._empty(k) for k in range(self.num_envs)]
        self.ep_return[:] = 0
        self.ep_length[:] = 0
        self.reward_norm.ret[:] = 0

    def _values(self, obs: np.ndarray) -> np.ndarray:
        assert self.critic is not None
        with torch.inference_mode():
            return self.critic(torch.from_numpy(obs)).numpy()

    def collect(self, iteration: int) -> RolloutBatch:
        """Run ``steps_per_env`` steps in every environment and return the batch."""
        assert self.raw_obs is not None, "call reset(seed) first"
        b = self.buf
        episodes: list[tuple[float, int, bool]] = []
        b["iteration"][:] = iteration
        b["final_values"][:] = 0.0
        with torch.inference_mode():  # once around the loop: entering it costs as much as a small op
            for t in range(self.steps_per_env):
                self._step(t, episodes)
        next_values = self._values(self.obs_norm(self.raw_obs)) if self.critic is not None else None
        return self._assemble(iteration, episodes, next_values)

    def _step(self, t: int, episodes: list[tuple[float, int, bool]]) -> None:
        """Act in every environment once and record the step at row ``t`` of the buffers."""
        b = self.buf
        # stored before stepping: without normalisation ``obs`` is the vector env's buffer (copy=False)
        assert self.raw_obs is not None
        b["obs"][t] = self.obs_norm(self.raw_obs, update=True)
        obs_t = torch.from_numpy(b["obs"][t])  # a view of the rollout buffer, no copy
        actions, logprobs = self.policy.act(obs_t, self.generator)
        if self.critic is not None:
            b["values"][t] = self.critic(obs_t).numpy()
        a = actions.numpy()
        env_actions = np.clip(a, self.low, self.high) if self.box else a
        self.raw_obs, reward, terminated, truncated, info = self.envs.step(env_actions)
        done = terminated | truncated
        b["actions"][t], b["logprobs"][t] = a, logprobs.numpy()
        b["rewards"][t] = self.reward_norm(reward, done)
        b["terminated"][t], b["truncated"][t] = terminated, truncated
        self.ep_return += reward
        self.ep_length += 1
        if done.any():
            for i in np.nonzero(done)[0]:
                episodes.append((float(self.ep_return[i]), int(self.ep_length[i]),
                                 bool(truncated[i] and not terminated[i])))
            self.ep_return[done] = 0.0
            self.ep_length[done] = 0
            boot = truncated & ~terminated
            if self.critic is not None and boot.any():
                idx = np.nonzero(boot)[0]
                final = np.stack([info["final_obs"][i] for i in idx])
                b["final_values"][t, idx] = self._values(self.obs_norm(final))

    def _assemble(self, iteration: int, episodes: list, next_values: Optional[np.ndarray]) -> RolloutBatch:
        carry = self.critic is None
        rows: list[tuple[dict[str, np.ndarray], int, Segment]] = []  # (stream, start, segment)
        for e in range(self.num_envs):
            new = {k: v[:, e] for k, v in self.buf.items()}
            stream = {k: np.concatenate([self.pending[e][k], new[k]]) for k in new} if carry else new
            ends = np.nonzero(stream["terminated"] | stream["truncated"])[0]
            start = 0
            for d in ends:
                length = int(d) - start + 1
                if stream["terminated"][d]:
                    rows.append((stream, start, Segment(e, length, "terminated", 0.0)))
                elif not carry:
                    rows.append((stream, start, Segment(e, length, "truncated", float(stream["final_values"][d]))))
                elif self.time_limit == "terminal":
                    rows.append((stream, start, Segment(e, length, "truncated", 0.0)))
                start = int(d) + 1
            rest = len(stream["terminated"]) - start
            if carry:
                self.pending[e] = {k: v[start:].copy() for k, v in stream.items()}
            elif rest > 0:
                assert next_values is not None
                rows.append((stream, start, Segment(e, rest, "cut", float(next_values[e]))))
        return self._pad(rows, iteration, episodes, carry)

    def _pad(self, rows: list, iteration: int, episodes: list, carry: bool) -> RolloutBatch:
        n = len(rows)
        t_max = max((s.length for _, _, s in rows), default=0)
        step_rewards = torch.zeros(n, t_max)
        mask = torch.zeros(n, t_max)
        values_pad = torch.zeros(n, t_max)
        flat: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "actions", "logprobs", "values", "iteration")}
        for i, (stream, start, seg) in enumerate(rows):
            sl = slice(start, start + seg.length)
            step_rewards[i, : seg.length] = torch.from_numpy(stream["rewards"][sl])
            values_pad[i, : seg.length] = torch.from_numpy(stream["values"][sl])
            mask[i, : seg.length] = 1.0
            for k in flat:
                flat[k].append(stream[k][sl])
        buf = self.buf

        def cat(k: str) -> Tensor:
            return torch.from_numpy(np.concatenate(flat[k])) if flat[k] else torch.from_numpy(buf[k][:0, 0])

        last_values = None if carry else torch.tensor([s.last_value for _, _, s in rows], dtype=torch.float32)
        return RolloutBatch(
            obs=cat("obs"),
            actions=cat("actions"),
            logprobs=cat("logprobs"),
            values=cat("values"),
            staleness=iteration - cat("iteration"),
            step_rewards=step_rewards,
            response_mask=mask,
            values_pad=None if carry else values_pad,
            last_values=last_values,
            segments=[s for _, _, s in rows],
            episodes=episodes,
            env_steps=self.steps_per_env * self.num_envs,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "raw_obs": None if self.raw_obs is None else self.raw_obs.copy(),
            "pending": [{k: v.copy() for k, v in p.items()} for p in self.pending],
            "ep_return": self.ep_return.copy(),
            "ep_length": self.ep_length.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_obs = state["raw_obs"]
        self.pending = state["pending"]
        self.ep_return, self.ep_length = state["ep_return"], state["ep_length"]
