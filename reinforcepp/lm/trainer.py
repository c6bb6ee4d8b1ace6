"""The language-model trainer: one loop for every advantage estimator.

Each step reads like docs/lm.md, "The training step and its batch sizes"::

    rollout    = generate k samples for P prompts, score them        (RolloutSampler)
    experience = old/ref log-probs, values; shaped rewards -> A      (ExperienceMaker)
    update     = epochs x mini-batches x micro-batches, clipped loss (PolicyUpdate)
    sync the engine, log, evaluate, checkpoint

The trainer only holds the loop. Its components are built by functions with explicit inputs
(:mod:`.components`); which estimator runs is known only to the experience maker, which passes
its name to :func:`reinforcepp.core.compute_advantages`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml

from ..config import ConfigError
from ..core import AdaptiveKLController, FixedKLController, get_estimator
from ..engines import can_stage
from ..remote import RemoteReference
from ..run import Progress, RunLogger, plot_run
from .balance import balance_ranks
from .packing import check_packing
from .checkpointing import load_checkpoint, save_checkpoint
from .components import Given, build_components
from .config import LMConfig
from .data import PromptLoader
from .evaluation import evaluate, held_out_rows
from .experience import Experience, ExperienceMaker
from .fused import fuse_old_logprobs
from .metrics import KLShareWarning, log_samples, rollout_metrics
from .producer import AsyncRollouts, build_producer
from .profile import update_flops
from .reference import refresh_reference
from .rollout import Rollout, RolloutSampler
from .runtime import Runtime, open_runtime, setup_torch
from .update import PolicyUpdate

class Trainer:
    """REINFORCE++ (and every registered estimator) on a Hugging Face causal LM.

    Args:
        config: the validated :class:`LMConfig`.
        model, tokenizer: an already-loaded policy and tokenizer (otherwise ``config.model``,
            or the built-in tiny model for ``config.task``).
        reward_funcs: callables ``fn(prompts, completions, **columns) -> list[float]`` or spec
            strings (otherwise ``config.reward_funcs``, or the built-in task's reward).
        train_dataset, eval_dataset: ``datasets.Dataset`` objects (or paths) with a prompt
            column (otherwise ``config.train_data`` / ``eval_data``).
        ref_model: an already-loaded reference model, or a
            :class:`~reinforcepp.remote.RemoteReference` (otherwise ``config.ref_model``).
        env: a factory of multi-turn environments, called once per episode (otherwise
            ``config.environment``, or the built-in task's); see docs/agents.md.
    """

    def __init__(self, config: LMConfig, *, model: Optional[torch.nn.Module] = None, tokenizer: Any = None,
                 reward_funcs: Optional[Sequence[Any]] = None, train_dataset: Any = None, eval_dataset: Any = None,
                 ref_model: Optional[torch.nn.Module | RemoteReference] = None,
                 env: Optional[Callable[[], Any]] = None) -> None:
        config.validate()
        self.config, self.spec = config, get_estimator(config.estimator)
        setup_torch(config)
        self.rt: Runtime = open_runtime(config, given_data=train_dataset is not None or eval_dataset is not None)
        given = Given(model, tokenizer, reward_funcs, train_dataset, eval_dataset, ref_model, env)
        parts = build_components(config, self.rt, self.spec, given)
        self.models, self.engine, self.data = parts.models, parts.engine, parts.data
        self.scorer, self.env_factory = parts.scorer, parts.env_factory
        # None: evaluation only (eval_data without train_data); train() then says what is missing
        self.loader = (PromptLoader(self.data.train, config.prompts_per_step, seed=config.seed)
                       if self.data.train is not None else None)
        self.kl_controller = make_kl_controller(config)
        self.updater = PolicyUpdate(config, self.rt, self.models, self.kl_controller)
        self.maker = self._experience_maker()
        self.step, self.tokens_total, self.eval_pass_fail = 0, 0, False
        self.kl_share_warning = KLShareWarning(config.kl_coef)
        saved = self.load_checkpoint(self.rt.resume_from) if self.rt.resume_from is not None else {}
        self.sampler, self.producer = self._rollout_side(saved)
        self.logger: Optional[RunLogger] = None
        if self.rt.folder.eager:
            self.open_run_folder()

    def _rollout_side(self, saved: dict[str, Any]) -> tuple[RolloutSampler, Optional[AsyncRollouts]]:
        """The sampler the trainer rolls out (synchronous) or evaluates with, and with
        ``async_rollouts`` the producer that rolls out on a thread of its own (producer.py)."""
        producer, scorer = None, self.scorer
        if self.config.async_rollouts and self.loader is not None:
            producer, self.engine, scorer = build_producer(self.config, self.rt, self.models, self.engine, self.scorer,
                                                           self.env_factory, self.spec, self.loader, self.step,
                                                           saved.get("async"))
        sampler = RolloutSampler(self.config, self.rt, self.engine, self.models.policy, self.models.tokenizer, scorer,
                                 self.env_factory, self.spec)
        sampler.prompts_truncated = int(saved.get("prompts_truncated", 0))
        if producer is None and can_stage(self.engine):  # rollout servers: this step's weights before the first rollout
            self.engine.sync_weights(self.policy, self.models.weights, version=self.step)
        else:
            self.engine.weight_version = self.step  # it holds the weights of this step (a resumed run's too)
        check_packing(self.config, self.models, sampler, self.data.train, self.env_factory is not None)
        return sampler, producer

    def _experience_maker(self) -> ExperienceMaker:
        cfg, rt = self.config, self.rt
        needs_old = cfg.effective_kl_placement == "reward" or cfg.teacher is not None
        responses = rt.prompts_per_rank * cfg.samples_per_prompt
        if cfg.micro_batch_tokens is None:
            fuse = fuse_old_logprobs(cfg.fuse_old_logprobs, cfg.on_policy, needs_old, responses, cfg.micro_batch_size)
            fuse = fuse and rt.parallel.can_hold_forwards(-(-responses // cfg.micro_batch_size))
        else:  # token budgets plan the micro-batches per step: fused only when asked, on one process
            fuse = bool(cfg.fuse_old_logprobs) and cfg.on_policy and needs_old and not rt.dist.enabled
        return ExperienceMaker(cfg, self.models, self.spec, self.kl_controller, device=rt.device,
                               forward=self.updater.forward, held=self.updater.held, fuse_old=fuse,
                               precision=rt.precision, timer=rt.timer, dist=rt.dist)

    def open_run_folder(self) -> None:
        """Claim and write the run folder: at construction when the run names it (``output_dir``),
        resumes or runs on several ranks, else when training starts, so that a trainer built only
        to evaluate writes nothing (:class:`~.runtime.RunFolder`)."""
        if not self.rt.folder.opened:
            self.rt.folder.open()
        if self.logger is None:
            self.logger = self._open_logger()

    def _open_logger(self) -> Optional[RunLogger]:
        """Rank 0 writes the run folder: the resolved config, metrics, TensorBoard."""
        if not self.rt.dist.is_main:
            return None
        cfg = self.config
        resolved = {**cfg.resolved(), "task": self.rt.builtin_task}
        logger = RunLogger(self.rt.run_dir, resolved, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project)
        if self.rt.resume_from is not None:
            logger.truncate(self.step)
        (self.rt.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        return logger

    # ------------------------------------------------------------------ what callers read
    policy = property(lambda self: self.models.policy)
    tokenizer = property(lambda self: self.models.tokenizer)
    ref_model = property(lambda self: self.models.reference)
    critic = property(lambda self: self.models.critic)
    optimizer = property(lambda self: self.updater.optimizer)
    critic_optimizer = property(lambda self: self.updater.critic_optimizer)
    kl_placement = property(lambda self: self.config.effective_kl_placement)
    dist = property(lambda self: self.rt.dist)
    parallel = property(lambda self: self.rt.parallel)
    run_dir = property(lambda self: self.rt.run_dir)
    checkpoints = property(lambda self: self.rt.checkpoints)
    builtin_task = property(lambda self: self.rt.builtin_task)
    train_data = property(lambda self: self.data.train)
    eval_data = property(lambda self: self.data.eval)
    eval_source = property(lambda self: self.data.eval_source)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        """Run until ``total_steps``; returns the last evaluation's metrics."""
        cfg = self.config
        self._train_loader()
        self.open_run_folder()
        last_eval: dict[str, float] = {}
        bar = Progress(cfg.total_steps, initial=self.step, desc=f"{cfg.estimator}",
                       enabled=cfg.progress and self.dist.is_main,
                       keys={"reward/mean": "reward", "kl/mean_token": "kl", "eval/accuracy": "acc",
                             "tokens_per_s": "tok/s"})
        # Rank 0 evaluates; under FSDP every rank does (gathering the sharded weights is collective), rank 0 logs.
        evaluates = (bool(cfg.eval_every) and self.eval_data is not None
                     and (self.dist.is_main or self.rt.parallel.sharded))
        self._start_producer(self.step)
        try:
            if self.step == 0 and evaluates:
                last_eval = self.evaluate()
            while self.step < cfg.total_steps:
                metrics = self.train_step()
                if evaluates and (self.step % cfg.eval_every == 0 or self.step == cfg.total_steps):
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                bar.update(metrics)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.total_steps:
                    with self.rt.timer("save"):
                        self.save_checkpoint()
        finally:
            bar.close()
            if self.producer is not None:
                self.producer.close()
            if self.logger is not None:
                self.logger.close()
        if self.dist.is_main:
            plot_run(self.run_dir)
        if cfg.profile:
            self.print_profile()
        return last_eval

    def train_step(self) -> dict[str, float]:
        """One RL step: rollout, experience, update, engine sync, log."""
        cfg = self.config
        self.open_run_folder()
        self.step += 1
        rollout = self.rollout()
        if self.producer is None:
            self.engine.sleep()
        with self.rt.timer("forward"):
            experience = self.make_experience(rollout)
        update_metrics = self.update(experience)
        if cfg.ref_update_every and self.step % cfg.ref_update_every == 0 and self.ref_model is not None:
            refresh_reference(self.ref_model, self.policy, cfg.ref_update_alpha)
            update_metrics["kl/ref_updated"] = 1.0
        self.sync_engine()
        metrics = self.step_metrics(rollout, experience, update_metrics)
        if self.logger is not None:
            self.logger.log(self.step, metrics)
            self.kl_share_warning(self.step, metrics.get("kl/return_share", 0.0))
        if cfg.log_samples_every and self.step % cfg.log_samples_every == 0 and self.dist.is_main:
            log_samples(self.run_dir / "samples.jsonl", self.step, rollout, cfg.num_logged_samples)
        return metrics

    def step_metrics(self, rollout: Rollout, experience: Experience,
                     update_metrics: dict[str, float]) -> dict[str, float]:
        """The step's metrics over every rank, with times, throughput and the next beta."""
        tokens = update_metrics.pop("update/real_tokens")  # the update's forwards, every epoch's, on this rank
        metrics = {**self.rollout_metrics(rollout, experience), **update_metrics, **self.rt.timer.pop()}
        flops = update_flops(sum(p.numel() for p in self.policy.parameters()), int(tokens))
        metrics["perf/update_flops_per_s"] = flops / max(1e-9, metrics["time/update"])
        metrics = self.dist.reduce_metrics(metrics)  # tokens summed over ranks, times of the slowest rank
        seconds = sum(v for k, v in metrics.items() if k.startswith("time/"))
        metrics["tokens_per_s"] = metrics["response/tokens"] / max(1e-9, seconds)
        # beta follows the global KL, so every rank keeps the same coefficient
        responses = int(self.dist.sum(float(len(experience))))
        metrics["kl/beta_next"] = self.kl_controller.update(metrics.get("kl/mean_sequence", 0.0), responses)
        return metrics

    def rollout_metrics(self, rollout: Rollout, exp: Experience) -> dict[str, float]:
        """This rank's rollout metrics, with the run's token count so far."""
        m = rollout_metrics(rollout, exp, self.kl_controller.value, self.step - 1, self.config.samples_per_prompt,
                            self.dist.reduce)
        self.tokens_total += int(self.dist.sum(float(exp.response_mask.sum())))
        m["response/tokens_total"] = float(self.tokens_total)
        return m

    def rollout(self) -> Rollout:
        """This step's scored samples: rolled out now (:meth:`RolloutSampler.rollout`), or taken
        from the producer, with any sample staler than ``async_rollouts`` dropped."""
        cfg = self.config
        if self.producer is None:
            rollout = self.sampler.rollout(self._train_loader().next_batch, self.step)
        else:
            self._start_producer(self.step - 1)  # this step's rollout is sampled by the weights before it
            with self.rt.timer("wait"):
                rollout = drop_stale(self.producer.next(self.step), self.step - 1, cfg.async_rollouts,
                                     cfg.samples_per_prompt)
        if cfg.micro_batch_tokens is not None and self.dist.enabled:  # every rank about as many tokens (balance.py)
            rollout = balance_ranks(rollout, self.dist, cfg.samples_per_prompt, cfg.share_prompt)
        return rollout

    def _start_producer(self, version: int) -> None:
        """Start the producer once (train(), or the first rollout), the current weights published
        as ``version``."""
        if self.producer is not None and not self.producer.thread.is_alive() and not self.producer.finished:
            self.producer.publish(version, self.models.weights)
            self.producer.start()

    def make_experience(self, rollout: Rollout) -> Experience:
        return self.maker(rollout)

    def update(self, exp: Experience) -> dict[str, float]:
        return self.updater(exp, self.step)

    def sync_engine(self) -> None:
        """Give the engine the updated weights (once per step, after its last optimizer step:
        nothing samples in between); skipped when every optimizer step was skipped."""
        changed, self.updater.weights_changed = self.updater.weights_changed, False
        if self.producer is not None:  # the version is published even unchanged: the producer's schedule counts them
            with self.rt.timer("sync"):
                self.producer.publish(self.step, self.models.weights if changed else None)
        if changed:
            with self.rt.timer("sync"):
                self.engine.sync_weights(self.policy, self.models.weights, version=self.step)
        elif self.producer is None and can_stage(self.engine):  # rollout servers: the same weights, a new version
            self.engine.stage_weights(None, version=self.step)
            self.engine.use_version(self.step)
        else:
            self.engine.weight_version = self.step

    def _train_loader(self) -> PromptLoader:
        if self.loader is None:
            raise ConfigError("no training data: train_data is not set (eval_data "
                              "alone is enough for evaluate(), not for train())")
        return self.loader

    # ------------------------------------------------------------------ evaluation, checkpoints
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics at the current step (:func:`~.evaluation.evaluate`), logged."""
        rows = held_out_rows(self.eval_data, self.config.eval_max_prompts)
        metrics, self.eval_pass_fail = evaluate(self.sampler, rows, self.config, self.step, self.rt.timer)
        if self.logger is not None:
            self.logger.log(self.step, metrics, kind="eval")
        return metrics

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of the run at this step (:mod:`.checkpointing`)."""
        cfg = self.config
        self.open_run_folder()
        counters: dict[str, Any] = {"kl_coef": self.kl_controller.value, "nonfinite_total": self.updater.guard.total,
                                    "tokens_total": self.tokens_total,
                                    "prompts_truncated": self.sampler.prompts_truncated}
        loader = self._train_loader().state_dict()
        if self.producer is not None:  # the producer's position and what it has generated since (producer.py)
            counters["async"] = self.producer.checkpoint(self.step)
            loader, counters["prompts_truncated"] = counters["async"]["loader"], counters["async"]["prompts_truncated"]
        return save_checkpoint(self.rt, self.models, self.updater, loader, self.step, counters,
                               merged=self.step == cfg.total_steps, save_reference=bool(cfg.ref_update_every))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore a checkpoint into the trainer; returns its state (the sampler's and the
        producer's parts are taken when they are built)."""
        state = load_checkpoint(path, self.rt, self.models, self.updater, self._train_loader(), seed=self.config.seed)
        self.step = state["step"]
        self.kl_controller.value = state["kl_coef"]
        self.updater.guard.total = state["nonfinite_total"]
        self.tokens_total = state["tokens_total"]
        return state

    def print_profile(self) -> None:
        """Time per phase, tokens/s and the update's FLOP/s utilisation over the run so far."""
        from ..run import read_metrics
        from .profile import matmul_flops_per_s, summary

        rows = [r for r in read_metrics(self.run_dir) if r.get("kind") == "train"]
        peak = matmul_flops_per_s(dtype=self.rt.autocast_dtype or self.rt.dtype, device=self.rt.device)
        print(summary(rows, peak), file=sys.stdout)


def drop_stale(rollout: Rollout, version: int, max_staleness: int, k: int) -> Rollout:
    """``rollout`` without the groups holding a sample sampled more than ``max_staleness``
    versions before ``version`` (its oldest token counts), counted in ``async/dropped_stale_samples``.
    The producer's schedule never makes one; a sample that comes from elsewhere (a lagging
    rollout server) is dropped rather than regenerated, which would stall the trainer."""
    versions = rollout.generation.token_versions
    rollout.counts["async/dropped_stale_samples"] = 0.0
    if versions is None:
        return rollout
    stale = [bool(v) and version - min(v) > max_staleness for v in versions]
    keep = [i for start in range(0, len(stale), k) if not any(stale[start : start + k])
            for i in range(start, start + k)]
    if len(keep) == len(stale):
        return rollout
    if not keep:
        raise RuntimeError(f"every sample of the rollout for version {version} "
                           f"is staler than async_rollouts={max_staleness}")
    kept = rollout.take(keep)
    kept.counts["async/dropped_stale_samples"] = float(len(stale) - len(keep))
    return kept


def make_kl_controller(config: LMConfig) -> AdaptiveKLController | FixedKLController:
    """Beta: adaptive (Ziegler et al. 2019) with ``kl_target``, else fixed at ``kl_coef``."""
    if config.kl_target:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)
