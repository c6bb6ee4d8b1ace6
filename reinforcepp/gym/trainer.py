"""The Gymnasium trainer: collect, make experience, update, log -- the same core as the
language-model trainer (``reinforcepp.core``), the same run directory (``reinforcepp.run``).

One iteration (docs/gym.md, "Loss and update"; the shared math in docs/algorithms.md):

1. collect ``num_envs * steps_per_env`` environment steps (:class:`~.rollout.Collector`);
2. advantages with the core registry, ``compute_advantages(estimator, ...)`` (KL placement
   ``none``: there is no reference policy);
3. ``epochs`` passes of shuffled mini-batches of ``mini_batch_size`` time steps; each is one
   optimizer step on ``aggregate(policy_loss(...), token-mean) - entropy_coef * H
   (+ value_coef * value_loss)``;
4. log; evaluate and checkpoint on schedule.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from ..core import (
    AdvantageParams,
    advantage_stats,
    aggregate,
    approx_kl,
    clip_fractions,
    compute_advantages,
    get_estimator,
    policy_loss,
    value_loss,
)
from ..core.natural import (
    backtracking_line_search,
    categorical_kl,
    conjugate_gradient,
    diagonal_gaussian_kl,
    fisher_vector_product,
    flat_grad,
    scale_to_kl_radius,
)
from ..run import CheckpointManager, DivergenceGuard, NonFiniteGuard, Progress, RunLogger, plot_run
from ..run.checkpoint import step_of
from ..run.folder import RunDirError, check_run_log, claim_run_dir
from ..run.state import load_state, save_state
from .envstate import restorable, set_vector_env_state, vector_env_state
from .evaluation import evaluate_policy
from .config import GymConfig
from .policy import Critic, ObsNormalizer, Policy, RewardNormalizer
from .rollout import Collector, RolloutBatch, make_vector_env


STATE_NAME = "state"
"""``state.safetensors`` + ``state.json`` in each checkpoint (:mod:`reinforcepp.run.state`)."""


def set_torch_threads(n: int) -> None:
    """Use ``n`` intra-op threads (0 = leave torch's default). Small MLPs gain nothing from more
    threads than one, and on a shared machine extra threads fight other processes for cores."""
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


class GymTrainer:
    """Trains a policy on ``cfg.env_id``. ``GymTrainer(cfg).train()`` returns the final
    evaluation metrics; the run directory holds everything else (``docs/gym.md``)."""

    def __init__(self, cfg: GymConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        set_torch_threads(cfg.torch_threads)
        self.spec = get_estimator(cfg.estimator)
        if not self.spec.needs_critic and (
            gym.spec(cfg.env_id).max_episode_steps is None and "max_episode_steps" not in cfg.env_kwargs
        ):
            raise ValueError(f"{cfg.env_id} has no time limit: critic-free estimators train on whole episodes; "
                             "set env_kwargs.max_episode_steps or use gae")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.envs = make_vector_env(cfg.env_id, cfg.num_envs, cfg.vectorization, cfg.env_kwargs)
        obs_space, act_space = self.envs.single_observation_space, self.envs.single_action_space
        self.policy = Policy(obs_space, act_space, cfg.hidden_sizes, cfg.activation, cfg.init_log_std)
        self.critic = Critic(obs_space, cfg.hidden_sizes, cfg.activation) if self.spec.needs_critic else None
        params = list(self.policy.parameters()) + (list(self.critic.parameters()) if self.critic is not None else [])
        self.params = params
        # fused: one kernel updates every parameter (the same Adam; per-tensor loops cost more than the math here)
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5, fused=True)
        # the update's loss; compiled, its forward and backward become a few fused kernels
        self.loss_fn = torch.compile(self.loss) if cfg.torch_compile else self.loss
        self.obs_norm = ObsNormalizer(obs_space.shape or (), cfg.normalize_obs, cfg.obs_clip)
        self.reward_norm = RewardNormalizer(cfg.num_envs, cfg.gamma, cfg.normalize_reward, cfg.obs_clip)
        self.collector = Collector(self.envs, self.policy, self.critic, self.obs_norm, self.reward_norm,
                                   cfg.steps_per_env, cfg.time_limit, self.generator)
        self.adv_params = AdvantageParams(gamma=cfg.gamma, lam=cfg.lam)
        self.iteration = 0
        self.env_steps = 0
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps,
                                    hint="Lower lr, check the rewards (normalize_reward=true), or the observations.")
        self.divergence = DivergenceGuard(cfg.max_weight_growth, self.policy.parameters(),
                                          hint="Lower lr (or raise max_weight_growth).")
        default_dir = f"runs/{cfg.env_id.replace('/', '_')}-{cfg.estimator}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg.output_dir = cfg.output_dir or default_dir
        self.run_dir = Path(cfg.output_dir)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.keep_last)

    # ----------------------------------------------------------------------------- the loop
    def train(self) -> dict[str, float]:
        """Run to ``total_env_steps``; returns the final evaluation's metrics."""
        cfg = self.cfg
        latest = self.checkpoints.latest_intact() if cfg.resume else None
        if cfg.resume and latest is None:
            raise RunDirError(f"resume=true but {self.run_dir} holds no complete checkpoint; "
                              "drop resume to start a new run")
        claim_run_dir(self.run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if latest is not None and cfg.resume:
            check_run_log(self.run_dir, step_of(latest))
            self.load(latest)
        else:
            self.collector.reset(cfg.seed)
        cfg.save(self.run_dir / "config.yaml")
        logger = RunLogger(self.run_dir, cfg.to_dict(), tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project)
        logger.truncate(self.env_steps)
        progress = Progress(cfg.num_iterations * cfg.rollout_steps, self.env_steps, desc=cfg.env_id,
                            enabled=cfg.progress,
                            keys={"episode/return_mean": "return", "eval/return_mean": "eval",
                                  "time/env_steps_per_s": "sps"})
        final: dict[str, float] = {}
        try:
            while self.iteration < cfg.num_iterations:
                metrics = self.step()
                logger.log(self.env_steps, metrics)
                progress.update(metrics, n=cfg.rollout_steps)
                last = self.iteration == cfg.num_iterations
                if last or (cfg.eval_every and self._crossed(cfg.eval_every)):
                    final = self.evaluate(cfg.eval_episodes, video_dir=self.run_dir / "videos" if cfg.video else None)
                    logger.log(self.env_steps, final, kind="eval")
                    progress.update(final, n=0)
                if last or (cfg.save_every and self._crossed(cfg.save_every)):
                    self.save()
        finally:
            progress.close()
            logger.close()
        plot_run(self.run_dir)
        return final

    def _crossed(self, every: int) -> bool:
        return (self.env_steps // every) > ((self.env_steps - self.cfg.rollout_steps) // every)

    def step(self) -> dict[str, float]:
        """One iteration: collect, make experience, update. Returns its metrics."""
        self._set_lr()
        t0 = time.perf_counter()
        batch = self.collector.collect(self.iteration)
        t1 = time.perf_counter()
        self.iteration += 1
        self.env_steps += batch.env_steps
        metrics = self._rollout_metrics(batch)
        if batch.num_steps > 0:
            advantages, returns = self.make_experience(batch)
            t2 = time.perf_counter()
            update = self.natural_update if self.cfg.trust_region == "natural" else self.update
            metrics.update(update(batch, advantages, returns))
            where = f"env step {self.env_steps}"
            metrics["policy/weight_norm"] = self.divergence.check(self.policy.parameters(), where=where)
            metrics.update(advantage_stats(self._pad(advantages, batch), batch.response_mask))
        else:
            t2 = t1
        t3 = time.perf_counter()
        metrics.update({
            "time/rollout": t1 - t0, "time/advantages": t2 - t1, "time/update": t3 - t2,
            "time/env_steps_per_s": batch.env_steps / max(t3 - t0, 1e-9),
            "env_steps": self.env_steps, "iteration": self.iteration, "lr": self.optimizer.param_groups[0]["lr"],
        })
        return metrics

    def make_experience(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """Core advantages over the batch's segments, returned flat ``(S,)`` like the steps."""
        out = compute_advantages(self.cfg.estimator, batch.advantage_inputs(), self.adv_params)
        real = batch.response_mask.bool()
        return out.advantages[real], out.returns[real]

    @staticmethod
    def _pad(flat: Tensor, batch: RolloutBatch) -> Tensor:
        padded = torch.zeros_like(batch.response_mask)
        padded[batch.response_mask.bool()] = flat
        return padded

    def update(self, batch: RolloutBatch, advantages: Tensor, returns: Tensor) -> dict[str, float]:
        """``epochs`` passes of shuffled mini-batches of steps; token-mean aggregation.

        Each epoch gathers its shuffled order once per field; the mini-batches are then
        contiguous slices (views) of it. Without an entropy bonus the entropy is computed for
        the log only, outside autograd."""
        cfg = self.cfg
        n = batch.num_steps
        fields = {"obs": batch.obs, "actions": batch.actions, "old": batch.logprobs, "adv": advantages}
        if self.critic is not None:
            fields.update(old_values=batch.values, returns=returns)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        sums: dict[str, list[Tensor]] = {"loss/policy": [], "loss/value": [], "entropy": [], "grad_norm": []}
        last_epoch: dict[str, list[Tensor]] = {"logprobs": [], "old": [], "low": [], "high": []}
        ones = torch.ones(min(n, cfg.mini_batch_size))
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=self.generator)
            shuffled = {k: v.index_select(0, order) for k, v in fields.items()}
            for start in range(0, n, cfg.mini_batch_size):
                mb = {k: v[start : start + cfg.mini_batch_size] for k, v in shuffled.items()}
                parts = self.loss_fn(mb, ones[: mb["adv"].shape[0]])
                loss, loss_pi, loss_ent, loss_v, logprobs, clipped_low, clipped_high = parts
                if loss_v is not None:
                    sums["loss/value"].append(loss_v.detach())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
                if not self.guard.check(loss, norm, where=f"env step {self.env_steps}"):
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                sums["loss/policy"].append(loss_pi.detach())
                sums["entropy"].append(loss_ent.detach())
                sums["grad_norm"].append(norm.detach())
                if epoch == cfg.epochs - 1:
                    last_epoch["logprobs"].append(logprobs.detach())
                    last_epoch["old"].append(mb["old"])
                    last_epoch["low"].append(clipped_low)
                    last_epoch["high"].append(clipped_high)
        out = {k: float(torch.stack(v).mean()) for k, v in sums.items() if v}
        out["nonfinite/skipped_steps"] = float(self.guard.total)
        if last_epoch["logprobs"]:
            cat = {k: torch.cat(v) for k, v in last_epoch.items()}
            ones = torch.ones(cat["logprobs"].shape[0])
            out["clip/frac_low"], out["clip/frac_high"] = clip_fractions(cat["low"], cat["high"], ones)
            out["approx_kl"] = approx_kl(cat["logprobs"], cat["old"], ones)
        if self.policy.log_std is not None:
            out["policy/std_mean"] = float(self.policy.log_std.detach().exp().mean())
        return out

    def loss(
        self, mb: dict[str, Tensor], mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
        """One mini-batch's loss, token-mean over its ``B`` steps (``mask``: ``(B,)`` ones):
        ``L = L_clip - c_ent * H [+ c_v * L_V]``. Returns the loss, its policy, entropy and
        value terms (value ``None`` without a critic), the log-probs and the clip indicators,
        ``(B,)`` each. ``torch_compile`` compiles this function (and so its backward)."""
        cfg = self.cfg
        size = mask.shape[0]
        entropy_grad = cfg.entropy_coef != 0.0
        logprobs, entropy = self.policy.logprobs_entropy(mb["obs"], mb["actions"], entropy_grad=entropy_grad)
        pl = policy_loss(logprobs, mb["old"], mb["adv"], cfg.eps_low, cfg.eps_high, cfg.dual_clip)
        loss_pi = aggregate(pl.loss, mask, "token-mean", num_tokens=size)
        loss_ent = aggregate(entropy, mask, "token-mean", num_tokens=size)
        loss = loss_pi - cfg.entropy_coef * loss_ent if entropy_grad else loss_pi
        loss_v = None
        if self.critic is not None:
            vl = value_loss(self.critic(mb["obs"]), mb["old_values"], mb["returns"], cfg.value_clip)
            loss_v = aggregate(vl, mask, "token-mean", num_tokens=size)
            loss = loss + cfg.value_coef * loss_v
        return loss, loss_pi, loss_ent, loss_v, logprobs, pl.clipped_low, pl.clipped_high

    # ----------------------------------------------------------------------------- trust_region=natural
    def natural_update(self, batch: RolloutBatch, advantages: Tensor, returns: Tensor) -> dict[str, float]:
        """``trust_region=natural``: one natural-gradient step of the policy on the whole rollout
        (:meth:`_natural_step`), then the critic's ``epochs`` x mini-batches of Adam (gae)."""
        out = self._natural_step(batch.obs, batch.actions, batch.logprobs, advantages)
        if self.critic is not None:
            out.update(self._critic_update(batch, returns))
        out["nonfinite/skipped_steps"] = float(self.guard.total)
        if self.policy.log_std is not None:
            out["policy/std_mean"] = float(self.policy.log_std.detach().exp().mean())
        return out

    def _natural_step(self, obs: Tensor, actions: Tensor, old: Tensor, advantages: Tensor) -> dict[str, float]:
        """TRPO (docs/algorithms.md, "Trust regions"): the policy minimises the surrogate
        ``L = -mean_t(ratio_t A_t)`` over the rollout's steps; ``g = grad L``,
        ``s ~ (F + cg_damping I)^-1 g`` by conjugate gradient on Fisher-vector products of the mean
        ``KL(pi_start || pi)`` over the rollout's states (``pi_start``: the policy before this
        step), the step ``-beta s`` scaled to the radius ``max_kl``, then the backtracking line
        search keeps the first fraction that lowers ``L`` with a measured KL <= ``max_kl`` (none:
        the policy is left as it was). ``autograd.grad`` never fills the policy's ``.grad``, so
        the shared Adam optimizer steps only the critic."""
        cfg, policy = self.cfg, self.policy
        params = list(policy.parameters())
        with torch.no_grad():
            start_out = policy(obs)
            start_log_std = None if policy.log_std is None else policy.log_std.detach().clone()
            entropy = policy.logprobs_entropy(obs, actions, entropy_grad=False)[1].mean()

        def surrogate() -> Tensor:
            logprobs = policy.logprobs_entropy(obs, actions, entropy_grad=False)[0]
            return -(torch.exp((logprobs - old).clamp(-20.0, 20.0)) * advantages).mean()

        def kl() -> Tensor:
            if start_log_std is None:
                return categorical_kl(start_out, policy(obs)).mean()
            assert policy.log_std is not None
            return diagonal_gaussian_kl(start_out, start_log_std, policy(obs), policy.log_std).mean()

        def fvp(v: Tensor) -> Tensor:
            return fisher_vector_product(kl, params, v, cfg.cg_damping)

        loss = surrogate()
        grad = flat_grad(loss, params)
        out = {"loss/policy": float(loss.detach()), "entropy": float(entropy), "grad_norm": float(grad.norm()),
               "natural/accepted_fraction": 0.0, "natural/step_kl": 0.0, "natural/improvement": 0.0,
               "natural/line_search_tries": 0.0}
        if not self.guard.check(out["loss/policy"], out["grad_norm"], where=f"env step {self.env_steps}"):
            self.optimizer.zero_grad(set_to_none=True)
            return out
        direction = conjugate_gradient(fvp, grad, cfg.cg_iters) if out["grad_norm"] > 0 else grad
        curvature = fvp(direction)
        if float(torch.dot(direction, curvature)) > 0:  # 0 only for a zero gradient (all advantages 0)
            full_step = -scale_to_kl_radius(direction, curvature, cfg.max_kl)
            search = backtracking_line_search(params, full_step, surrogate, kl, cfg.max_kl,
                                              shrink=cfg.line_search_shrink, max_tries=cfg.line_search_steps,
                                              loss_before=out["loss/policy"])
            out.update({"natural/accepted_fraction": search.fraction, "natural/step_kl": search.kl,
                        "natural/improvement": search.improvement, "natural/line_search_tries": float(search.tries)})
        with torch.no_grad():
            logprobs = policy.logprobs_entropy(obs, actions, entropy_grad=False)[0]
            out["approx_kl"] = approx_kl(logprobs, old, torch.ones_like(old))
        return out

    def _critic_update(self, batch: RolloutBatch, returns: Tensor) -> dict[str, float]:
        """The critic's ``epochs`` passes of shuffled mini-batches of ``value_coef * L_V`` (Adam,
        gradient-norm clip over the critic's parameters), as the clip path trains it."""
        assert self.critic is not None
        cfg = self.cfg
        critic_params = list(self.critic.parameters())
        fields = {"obs": batch.obs, "old_values": batch.values, "returns": returns}
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        losses: list[Tensor] = []
        for _ in range(cfg.epochs):
            order = torch.randperm(batch.num_steps, generator=self.generator)
            shuffled = {k: v.index_select(0, order) for k, v in fields.items()}
            for start in range(0, batch.num_steps, cfg.mini_batch_size):
                mb = {k: v[start : start + cfg.mini_batch_size] for k, v in shuffled.items()}
                vl = value_loss(self.critic(mb["obs"]), mb["old_values"], mb["returns"], cfg.value_clip)
                loss_v = aggregate(vl, torch.ones_like(vl), "token-mean")
                self.optimizer.zero_grad(set_to_none=True)
                (cfg.value_coef * loss_v).backward()
                norm = torch.nn.utils.clip_grad_norm_(critic_params, max_norm, foreach=True)
                # only the policy's step resets
                if not self.guard.check(loss_v, norm, where=f"env step {self.env_steps}", reset=False):
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                losses.append(loss_v.detach())
        return {"loss/value": float(torch.stack(losses).mean())} if losses else {}

    def _rollout_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        m: dict[str, float] = {"episodes": len(batch.episodes), "train/steps": batch.num_steps,
                               "train/segments": len(batch.segments)}
        if batch.episodes:
            ret = np.array([e[0] for e in batch.episodes])
            length = np.array([e[1] for e in batch.episodes])
            m.update({
                "episode/return_mean": float(ret.mean()), "episode/return_std": float(ret.std()),
                "episode/return_min": float(ret.min()), "episode/return_max": float(ret.max()),
                "episode/length_mean": float(length.mean()), "episode/length_max": float(length.max()),
                "episode/truncated_frac": float(np.mean([e[2] for e in batch.episodes])),
            })
        if batch.num_steps:
            m["train/staleness_mean"] = float(batch.staleness.float().mean())
            m["reward/step_mean"] = float(batch.step_rewards.sum() / batch.response_mask.sum())
        return m

    def _set_lr(self) -> None:
        frac = 1.0 - self.iteration / self.cfg.num_iterations if self.cfg.lr_schedule == "linear" else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * frac

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(
        self, episodes: int, video_dir: Optional[Path] = None, seed: Optional[int] = None
    ) -> dict[str, float]:
        """Deterministic evaluation (the mode of the policy: argmax / Gaussian mean) over
        ``episodes`` episodes of a fresh environment seeded ``seed, seed + 1, ...`` (default:
        ``cfg.seed + 1_000_000``, the same episodes at every evaluation), observation statistics
        frozen. With ``video_dir``, the first episode is recorded there (needs the render extra)."""
        seed = self.cfg.seed + 1_000_000 if seed is None else seed
        bounds = (self.collector.low, self.collector.high) if self.collector.box else None
        return evaluate_policy(self.policy, self.obs_norm, self.cfg.env_id, self.cfg.env_kwargs, episodes, seed,
                               action_bounds=bounds, video_dir=video_dir, video_prefix=f"step_{self.env_steps:08d}")

    # ----------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Atomic checkpoint ``output_dir/checkpoints/step_<env_steps>/state.{safetensors,json}``
        (no pickle): weights, optimizer, normalisers, RNG states, the collector's carried
        segments and (classic-control and other plain-data envs) the environments' state."""
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "policy": self.policy.state_dict(),
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "obs_norm": self.obs_norm.rms.state_dict(),
            "reward_norm": self.reward_norm.state_dict(),
            "generator": self.generator.get_state(),
            "collector": self.collector.state_dict(),
            "nonfinite_total": self.guard.total,
            "weight_norm_start": self.divergence.start,
            "envs": vector_env_state(self.envs) if restorable(self.envs) else None,
            "config": self.cfg.to_dict(),
        }
        with self.checkpoints.save(self.env_steps) as d:
            save_state(d, STATE_NAME, state)
        return self.checkpoints.path(self.env_steps)

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save`. Resume is exact when the environments
        were saved; otherwise (async or Box2D/MuJoCo envs) they restart fresh episodes, seeded
        by the iteration, and the carried segments are dropped."""
        state = load_state(path, STATE_NAME)
        self.iteration, self.env_steps = state["iteration"], state["env_steps"]
        self.guard.total = int(state.get("nonfinite_total", 0))
        self.divergence.start = float(state.get("weight_norm_start", self.divergence.start))
        self.policy.load_state_dict(state["policy"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.obs_norm.rms.load_state_dict(state["obs_norm"])
        self.reward_norm.load_state_dict(state["reward_norm"])
        self.generator.set_state(state["generator"])
        if state["envs"] is not None and restorable(self.envs):
            set_vector_env_state(self.envs, state["envs"], where=str(Path(path) / f"{STATE_NAME}.json"))
            self.collector.load_state_dict(state["collector"])
        else:
            warnings.warn("environment state was not saved (Box2D/MuJoCo or async envs): resuming with fresh "
                          "episodes", stacklevel=2)
            self.collector.reset(self.cfg.seed + 7919 * self.iteration)

    def close(self) -> None:
        self.envs.close()


def train(cfg: GymConfig) -> dict[str, float]:
    """Python API: train with ``cfg`` and return the final evaluation metrics."""
    trainer = GymTrainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
