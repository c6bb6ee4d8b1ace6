"""Configuration of the Gymnasium trainer: one flat, typed dataclass, validated once.

Every batch-size knob is named by its unit: ``num_envs`` environments, ``steps_per_env`` time
steps collected per environment per rollout, ``mini_batch_size`` *time steps* per optimizer step,
``total_env_steps`` environment steps over the whole run (summed over the environments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import ConfigError, TrustRegionOptions, option
from ..run.options import RunOptions


@dataclass
class GymConfig(TrustRegionOptions, RunOptions):
    """REINFORCE++ (and siblings) on a Gymnasium environment. See ``docs/gym.md``."""

    COMMON = ("env_id", "estimator", "total_env_steps", "num_envs", "steps_per_env", "lr", "output_dir", "seed",
              "eval_every", "save_every", "resume")
    SECTIONS = (("output_dir", "Run folder and logging"), ("env_id", "Environment"), ("estimator", "Algorithm"),
                ("trust_region", "Trust region"), ("entropy_coef", "Loss and update"), ("hidden_sizes", "Model"),
                ("torch_compile", "Speed, evaluation and checkpoints"))

    # environment
    env_id: str = option(
        "CartPole-v1", "Gymnasium environment id (any registered id; Box2D/MuJoCo need the box2d/mujoco extras)")
    env_kwargs: dict = option({}, "keyword arguments passed to gymnasium.make_vec for every environment")
    num_envs: int = option(8, "parallel environments in the vector env")
    vectorization: Literal["sync", "async"] = option(
        "sync", "sync: all envs in this process (fastest for cheap envs); async: one subprocess per env")
    total_env_steps: int = option(100_000, "environment steps of the whole run, summed over the environments")
    steps_per_env: int = option(
        128, "time steps collected per environment per rollout (rollout = num_envs * steps_per_env steps)")
    # algorithm
    estimator: str = option(
        "reinforce_pp", "advantage estimator from the core registry: reinforce_pp (critic-free, default), reinforce, "
        "gae (PPO with a critic), or one you registered")
    gamma: float = option(0.99, "discount of the returns within an episode")
    lam: float = option(0.95, "GAE lambda (gae only)")
    time_limit: Literal["terminal", "drop"] = option(
        "terminal", "critic-free estimators: an episode cut by the time limit is treated as terminal (return = rewards "
        "received) or dropped from the loss; gae always bootstraps with V(s_T)")
    epochs: int = option(4, "passes over each rollout")
    mini_batch_size: int = option(256, "time steps per mini-batch (one optimizer step each)")
    lr: float = option(3e-4, "Adam learning rate (policy and critic)")
    lr_schedule: Literal["constant", "linear"] = option(
        "constant", "learning rate schedule over total_env_steps (linear: decays to 0)")
    eps_low: float = option(0.2, "lower clip of the importance ratio: ratio >= 1 - eps_low")
    eps_high: float = option(0.2, "upper clip of the importance ratio: ratio <= 1 + eps_high")
    dual_clip: Optional[float] = option(None, "dual-clip constant c > 1 for negative advantages, or None")
    entropy_coef: float = option(0.0, "entropy bonus coefficient (entropy is logged either way)")
    value_coef: float = option(0.5, "weight of the value loss (gae only)")
    value_clip: Optional[float] = option(
        None, "clip range of the value loss around the rollout's values, or None for the plain squared error "
        "(gae only)")
    max_grad_norm: float = option(0.5, "gradient-norm clip per optimizer step (0 = no clipping)")
    # model
    hidden_sizes: list[int] = option([64, 64], "hidden layer widths of the policy MLP (and of the critic's)")
    activation: Literal["tanh", "relu"] = option("tanh", "hidden activation")
    init_log_std: float = option(0.0, "initial log standard deviation of the Gaussian policy (Box actions)")
    normalize_obs: bool = option(
        False, "normalise observations by a running mean/std (frozen during evaluation; saved in checkpoints)")
    normalize_reward: bool = option(
        False, "divide rewards by a running std of the discounted return (as SB3's VecNormalize)")
    obs_clip: float = option(10.0, "clip of normalised observations (and normalised rewards)")
    # run
    torch_compile: bool = option(
        False, "torch.compile the update's loss (policy and critic forwards, losses; the backward through them): "
        "fewer kernel launches per mini-batch; the first update pays the compilation (seconds). "
        "Measured in benchmarks/gym.md")
    torch_threads: int = option(1, "torch intra-op threads; 1 is fastest for small MLPs (0 = leave torch's default)")
    eval_every: int = option(10_000, "evaluate every this many environment steps (0 = only at the end)")
    eval_episodes: int = option(10, "episodes per deterministic evaluation")
    save_every: int = option(0, "checkpoint every this many environment steps (0 = only at the end)")
    video: bool = option(
        False, "record one deterministic evaluation episode per evaluation to output_dir/videos (needs the render "
        "extra)")

    @property
    def rollout_steps(self) -> int:
        """Environment steps per rollout (``num_envs * steps_per_env``)."""
        return self.num_envs * self.steps_per_env

    @property
    def num_iterations(self) -> int:
        """Rollouts in the run: ``ceil(total_env_steps / rollout_steps)``."""
        return -(-self.total_env_steps // self.rollout_steps)

    def validate(self) -> None:
        super().validate()
        from ..core import get_estimator

        try:
            spec = get_estimator(self.estimator)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if spec.needs_groups:
            raise ConfigError(
                f"estimator {self.estimator!r} compares several samples of one prompt; a Gymnasium episode has no "
                "prompt to repeat (each reset draws a new start state). Use reinforce_pp, reinforce or gae."
            )
        positive = {"num_envs": self.num_envs, "steps_per_env": self.steps_per_env,
                    "total_env_steps": self.total_env_steps,
                    "epochs": self.epochs, "mini_batch_size": self.mini_batch_size, "eval_episodes": self.eval_episodes}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.eps_low <= 0 or self.eps_low >= 1 or self.eps_high <= 0:
            raise ConfigError(f"need 0 < eps_low < 1 and eps_high > 0, got eps_low={self.eps_low}, "
                              f"eps_high={self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ConfigError(f"hidden_sizes must be a non-empty list of positive widths, got {self.hidden_sizes}")
        if self.torch_threads < 0 or self.eval_every < 0 or self.save_every < 0:
            raise ConfigError("torch_threads, eval_every and save_every must be >= 0")
        if self.entropy_coef < 0 or self.value_coef < 0 or self.max_grad_norm < 0 or self.obs_clip <= 0:
            raise ConfigError("entropy_coef, value_coef, max_grad_norm must be >= 0 and obs_clip > 0")
        self._validate_trust_region()

    def _validate_trust_region(self) -> None:
        """The natural step's settings and, with ``trust_region=natural``, the options it cannot honour."""
        if self.trust_region != "natural":
            return
        if self.entropy_coef != 0:
            raise ConfigError(f"entropy_coef={self.entropy_coef}: trust_region=natural steps on mean(ratio * A) "
                              "alone (TRPO); set entropy_coef=0")
        if self.dual_clip is not None:
            raise ConfigError(f"dual_clip={self.dual_clip} is an option of trust_region=clip; "
                              "trust_region=natural clips nothing")
        if self.torch_compile:
            raise ConfigError("torch_compile=true compiles the clipped loss, which trust_region=natural does not use; "
                              "set torch_compile=false")
