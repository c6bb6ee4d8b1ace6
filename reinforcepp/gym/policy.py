"""Policies, critic and running normalisers for Gymnasium control.

A policy maps observations ``(B, obs_dim)`` to an action distribution: categorical over
``n`` actions for ``Discrete`` spaces, diagonal Gaussian with a state-independent learned
``log_std`` for ``Box`` spaces. Sampling and log-probabilities are written directly (no
``torch.distributions`` objects), and the MLPs are evaluated functionally (``torch.addmm`` on
the layers' parameters, not ``nn.Sequential`` dispatch), because on 64-64 networks fed a few
rows at a time the per-call overhead costs more than the arithmetic.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from ..core import entropy_from_logits

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def mlp(sizes: Sequence[int], activation: str, out_gain: float) -> nn.Sequential:
    """Linear layers with ``activation`` between them, orthogonal init (gain sqrt(2) on hidden
    layers, ``out_gain`` on the last; biases 0), as in PPO's reference implementations."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(a, b)
        last = i == len(sizes) - 2
        nn.init.orthogonal_(linear.weight, out_gain if last else math.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(act())
    return nn.Sequential(*layers)


_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


def mlp_forward(linears: Sequence[nn.Linear], x: Tensor, activation: str) -> Tensor:
    """The network of :func:`mlp` (given its ``nn.Linear`` layers) on ``x`` ``(B, in)``, without
    module dispatch: one ``torch.addmm`` per layer, the activation between layers."""
    act = _ACTIVATIONS[activation]
    for linear in linears[:-1]:
        x = act(torch.addmm(linear.bias, x, linear.weight.t()))
    last = linears[-1]
    return torch.addmm(last.bias, x, last.weight.t())


def sample_categorical(logprobs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One sample per row of a categorical given its log-probabilities ``(B, n)``, by inverse
    CDF: ``a = #{k : cdf_k < u}`` with ``u ~ U[0, 1)`` (one ``torch.rand`` per row; cheaper
    than ``torch.multinomial`` on small batches). Returns ``(B,)`` long."""
    u = torch.rand(logprobs.shape[0], 1, generator=generator, dtype=logprobs.dtype)
    cdf = logprobs.exp().cumsum(-1)
    # a row's cdf can end a rounding error below 1; u above it takes the last action
    return (cdf < u).sum(-1).clamp_max_(logprobs.shape[-1] - 1)


def flat_obs_dim(space: spaces.Space) -> int:
    if not isinstance(space, spaces.Box):
        raise ValueError(f"observation space {space} is not supported: the MLP policies take flat Box observations")
    return int(np.prod(space.shape))


class Policy(nn.Module):
    """MLP policy: categorical for ``Discrete`` actions, diagonal Gaussian for ``Box`` actions.

    Args:
        observation_space: a flat ``Box``.
        action_space: ``Discrete(n)`` or ``Box(shape=(d,))``.
        hidden_sizes: hidden widths.
        activation: ``"tanh"`` or ``"relu"``.
        init_log_std: initial ``log_std`` of the Gaussian (Box only).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        hidden_sizes: Sequence[int],
        activation: str = "tanh",
        init_log_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.activation = activation
        obs_dim = flat_obs_dim(observation_space)
        if isinstance(action_space, spaces.Discrete):
            self.discrete = True
            out = int(action_space.n)
        elif isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
            self.discrete = False
            out = int(action_space.shape[0])
        else:
            raise ValueError(f"action space {action_space} is not supported: use Discrete or a 1-D Box")
        self.net = mlp([obs_dim, *hidden_sizes, out], activation, out_gain=0.01)
        self.log_std = nn.Parameter(torch.full((out,), float(init_log_std))) if not self.discrete else None
        self.linears = tuple(m for m in self.net if isinstance(m, nn.Linear))  # a plain tuple: not registered twice

    def forward(self, obs: Tensor) -> Tensor:
        """Logits ``(B, n)`` (Discrete) or Gaussian means ``(B, d)`` (Box)."""
        return mlp_forward(self.linears, obs, self.activation)

    def _gaussian_logprob(self, mean: Tensor, actions: Tensor) -> Tensor:
        assert self.log_std is not None
        z = (actions - mean) * torch.exp(-self.log_std)
        return (-0.5 * z.square() - self.log_std - _LOG_SQRT_2PI).sum(-1)

    def act(
        self, obs: Tensor, generator: torch.Generator | None = None, deterministic: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Sample (or take the mode of) the action distribution.

        Args:
            obs: ``(B, obs_dim)``.
        Returns:
            ``actions`` (``(B,)`` long, or ``(B, d)`` float, unclipped) and their ``logprobs`` ``(B,)``.
        """
        out = self.forward(obs)
        if self.discrete:
            logp_all = torch.log_softmax(out, dim=-1)
            if deterministic:
                actions = out.argmax(-1)
            else:
                actions = sample_categorical(logp_all, generator)
            return actions, logp_all.gather(-1, actions[:, None]).squeeze(-1)
        assert self.log_std is not None
        if deterministic:
            actions = out
        else:
            noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
            actions = out + noise * self.log_std.exp()
        return actions, self._gaussian_logprob(out, actions)

    def logprobs_entropy(self, obs: Tensor, actions: Tensor, entropy_grad: bool = True) -> tuple[Tensor, Tensor]:
        """``logprobs`` of ``actions`` and the entropy of the distribution, both ``(B,)``.
        With ``entropy_grad=False`` the entropy is computed outside autograd (for logging only,
        when the loss has no entropy bonus: the backward pass then skips it)."""
        out = self.forward(obs)
        if self.discrete:
            logp_all = torch.log_softmax(out, dim=-1)
            entropy = entropy_from_logits(out if entropy_grad else out.detach())
            return logp_all.gather(-1, actions.long()[:, None]).squeeze(-1), entropy
        assert self.log_std is not None
        log_std = self.log_std if entropy_grad else self.log_std.detach()
        entropy = (0.5 + _LOG_SQRT_2PI + log_std).sum().expand(out.shape[0])
        return self._gaussian_logprob(out, actions), entropy


class Critic(nn.Module):
    """State-value MLP ``V(s)``: ``(B, obs_dim)`` -> ``(B,)`` (``gae`` only)."""

    def __init__(self, observation_space: spaces.Space, hidden_sizes: Sequence[int], activation: str = "tanh") -> None:
        super().__init__()
        self.activation = activation
        self.net = mlp([flat_obs_dim(observation_space), *hidden_sizes, 1], activation, out_gain=1.0)
        self.linears = tuple(m for m in self.net if isinstance(m, nn.Linear))

    def forward(self, obs: Tensor) -> Tensor:
        return mlp_forward(self.linears, obs, self.activation).squeeze(-1)


class RunningMeanStd:
    """Running mean and population variance of a stream of batches (Chan et al. parallel
    update), in float64. ``shape`` is the shape of one sample."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4
        self.rejected = 0

    def update(self, batch: np.ndarray) -> None:
        """``batch``: ``(B, *shape)``. Samples holding inf or NaN are left out (counted in
        ``rejected``): one bad observation or reward must not poison the statistics forever."""
        finite = np.isfinite(batch).reshape(batch.shape[0], -1).all(1)
        if not finite.all():
            self.rejected += int((~finite).sum())
            batch = batch[finite]
            if batch.shape[0] == 0:
                return
        b_mean, b_var, b_count = batch.mean(0), batch.var(0), batch.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = np.array(state["mean"]), np.array(state["var"]), float(state["count"])


class ObsNormalizer:
    """``clip((obs - mean) / sqrt(var + 1e-8), -clip, clip)`` with running statistics, updated
    on every training observation and frozen during evaluation. Identity when disabled."""

    def __init__(self, shape: tuple[int, ...], enabled: bool, clip: float) -> None:
        self.enabled, self.clip = enabled, clip
        self.rms = RunningMeanStd(shape)

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        if not self.enabled:
            return obs.astype(np.float32, copy=False)
        if update:
            self.rms.update(obs)
        return np.clip((obs - self.rms.mean) / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip).astype(np.float32)


class RewardNormalizer:
    """Divides rewards by the running std of the discounted return ``ret <- gamma ret + r``
    (reset at episode ends), then clips; the scaling of SB3's ``VecNormalize``. Identity when
    disabled. Only the scale changes, so the optimal policy does not."""

    def __init__(self, num_envs: int, gamma: float, enabled: bool, clip: float) -> None:
        self.enabled, self.gamma, self.clip = enabled, gamma, clip
        self.rms = RunningMeanStd(())
        self.ret = np.zeros(num_envs, np.float64)

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return rewards.astype(np.float32)
        self.ret = self.ret * self.gamma + rewards
        self.rms.update(self.ret)
        self.ret[dones | ~np.isfinite(self.ret)] = 0.0
        return np.clip(rewards / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        return {"rms": self.rms.state_dict(), "ret": self.ret.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.rms.load_state_dict(state["rms"])
        self.ret = np.array(state["ret"])
