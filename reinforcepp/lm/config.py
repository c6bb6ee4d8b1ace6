"""The one configuration of the language-model trainer: YAML file, ``key=value`` overrides and
the Python API all build this dataclass, validated once before any model is loaded.

Batch sizes are counted in *responses* (one prompt's sample = one response) unless the name
says prompts: a step generates ``prompts_per_step * samples_per_prompt`` responses (the
rollout), which is split into mini-batches of ``mini_batch_size`` responses (one optimizer step
each), each accumulated over micro-batches of ``micro_batch_size`` responses, for ``epochs``
passes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, cast

from ..config import ConfigError, TrustRegionOptions
from ..core import ESTIMATORS, KL_ESTIMATORS, LOSS_AGGS, KLEstimatorName, LossAgg, get_estimator
from ..engines import check_engine_config
from ..run.options import RunOptions
from .options import LMOptions


@dataclasses.dataclass
class LMConfig(LMOptions, TrustRegionOptions, RunOptions):
    """A language-model run's configuration: the options every run has, the trust region's and the
    trainer's own (:class:`~reinforcepp.lm.options.LMOptions`), the sizes derived from them, the
    :meth:`tiny` preset and the validation that runs once, before any model loads."""

    COMMON = ("model", "train_data", "eval_data", "reward_funcs", "output_dir", "estimator", "lr", "total_steps",
              "prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch_size", "kl_coef", "eval_every",
              "save_every", "resume")
    SECTIONS = (("output_dir", "Run folder and logging"), ("model", "Models"), ("remote_timeout", "Remote services"),
                ("task", "Data and task"), ("environment", "Multi-turn episodes"), ("reward_funcs", "Rewards"),
                ("estimator", "Algorithm"), ("trust_region", "Trust region"),
                ("async_rollouts", "Asynchronous rollouts and off-policy correction"),
                ("total_steps", "Batch and optimisation"), ("engine", "Generation"),
                ("eval_every", "Evaluation"), ("sft_steps", "Warm start (built-in tasks)"),
                ("save_every", "Checkpoints and outputs"))

    @classmethod
    def from_dict(cls, values: dict) -> "LMConfig":
        """:meth:`Config.from_dict`; ``rollout_urls`` without ``engine`` selects ``engine=remote``,
        and with any other ``engine`` is refused."""
        urls = values.get("rollout_urls")
        if urls not in (None, "", [], "[]", "None", "none") and values.get("engine", "remote") != "remote":
            raise ConfigError(f"rollout_urls sends generation to rollout servers (engine=remote), but "
                              f"engine={values['engine']} is set too: drop engine, or rollout_urls")
        if urls not in (None, "", [], "[]", "None", "none"):
            values = {**values, "engine": "remote"}
        return super().from_dict(values)

    def _validate_scale(self) -> None:
        """LoRA and sharding options: refused in combinations that cannot work, naming both keys."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)
                    if f.name.startswith("lora_") and f.name != "lora_rank"}
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0 = off), got {self.lora_rank}")
        if self.lora_rank == 0:
            changed = [k for k in ("lora_alpha", "lora_dropout") if getattr(self, k) != defaults[k]]
            changed += ["lora_target_modules"] if self.lora_target_modules else []
            if changed:
                raise ConfigError(f"{', '.join(changed)} set but lora_rank=0 (LoRA off); "
                                  "set lora_rank > 0 to train adapters")
        else:
            if self.estimator == "gae":
                raise ConfigError("lora_rank > 0 with estimator=gae: the critic would need its own adapter, which "
                                  "is not supported; use full fine-tuning (lora_rank=0) or a critic-free estimator")
            if self.ref_model is not None:
                raise ConfigError("lora_rank > 0 with ref_model set: with LoRA the reference "
                                  "is the base model with adapters disabled; unset ref_model")
            if not 0 <= self.lora_dropout < 1:
                raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.ref_update_every and (self.lora_rank or self.fsdp):
            key = "lora_rank > 0" if self.lora_rank else "fsdp=true"
            raise ConfigError(f"ref_update_every with {key}: refreshing the reference "
                              "is supported for full fine-tuning without sharding only")
        if self.fsdp and (self.dynamic_filtering or self.reward_on_error == "drop"):
            key = "dynamic_filtering=true" if self.dynamic_filtering else "reward_on_error=drop"
            raise ConfigError(f"fsdp=true with {key}: sharded forwards need the same number "
                              "of responses on every rank, which dropping groups breaks")

    def _validate_async(self) -> None:
        """Asynchronous rollouts and the off-policy correction, before any model loads."""
        from ..core import check_rollout_correction
        from ..engines import get_engine

        if self.async_rollouts < 0:
            raise ConfigError(f"async_rollouts must be >= 0 (0 = synchronous), got {self.async_rollouts}")
        if self.partial_rollouts and not self.async_rollouts:
            raise ConfigError("partial_rollouts=true continues generations across weight "
                              "updates of asynchronous rollouts; set async_rollouts >= 1")
        mode, low, high = self.resolved_rollout_correction, self.rollout_correction_low, self.rollout_correction_high
        if mode == "none" and (low is not None or high != 2.0):
            raise ConfigError("rollout_correction_low/high are set but "
                              "rollout_correction=none: set rollout_correction=truncate or mask")
        if not (math.isfinite(high) and high > 0):
            raise ConfigError(f"rollout_correction_high must be a finite number > 0, got {high}")
        if low is not None and mode != "mask":
            raise ConfigError(f"rollout_correction_low={low} applies to "
                              "rollout_correction=mask only (truncate caps from above)")
        if mode == "mask" and not ((low or 0.0) <= 1.0 <= high):
            raise ConfigError(f"rollout_correction_low={low} and rollout_correction_high={high} "
                              "must bracket 1 (an on-policy token's weight): low <= 1 <= high")
        bounds = {"low": low, "high": high if mode != "none" else None}
        try:
            check_rollout_correction(mode, self.rollout_correction_level, **bounds)
        except ValueError as e:
            raise ConfigError(f"rollout_correction={mode}, "
                              f"rollout_correction_level={self.rollout_correction_level}: {e}") from None
        engine = get_engine(self.engine)
        if mode != "none" and not engine.logprobs:
            raise ConfigError(f"rollout_correction={mode} needs the log-probs the engine sampled with, and "
                              f"engine {self.engine!r} does not report them: set rollout_correction=none")
        if self.async_rollouts and not engine.seeded:
            raise ConfigError("async_rollouts needs an engine that draws from its own seed; engine "
                              f"{self.engine!r} draws from the generator the trainer uses: use engine=hf or vllm")
        if self.async_rollouts and self.vllm_sleep:
            raise ConfigError("async_rollouts keeps vLLM generating while the trainer updates; "
                              "vllm_sleep=true would put it to sleep then: set vllm_sleep=false")

    def _validate_natural(self) -> None:
        """``trust_region=natural`` and the options it cannot honour, before any model loads."""
        if self.trust_region != "natural":
            return
        critic = get_estimator(self.estimator).needs_critic
        refusals = {
            "fsdp=true": self.fsdp,
            f"entropy_coef={self.entropy_coef} (the natural step follows mean(ratio * A) alone, as TRPO)":
                self.entropy_coef != 0,
            f"dual_clip={self.dual_clip} (an option of the clipped ratio)": self.dual_clip is not None,
            "importance_sampling_level=sequence": self.importance_sampling_level != "token",
            f"torch_compile={self.torch_compile} (the natural step runs the plain policy)":
                self.torch_compile in ("update", "all"),
            f"epochs={self.epochs} / mini_batch_size={self.mini_batch_size} (one natural step per rollout; they apply "
            "to a critic, and this estimator has none)":
                not critic and (self.epochs != 1 or self.mini_batch_size is not None),
        }
        for what, refused in refusals.items():
            if refused:
                raise ConfigError(f"trust_region=natural cannot honour {what}: use trust_region=clip, or drop it")

    def _validate_losses(self) -> None:
        """The policy loss, its own options (refused under another loss), distillation, the task's knobs."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        owners = {"cispo": ("cispo_eps_low", "cispo_eps_high"),
                  "clip_cov": ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"),
                  "kl_cov": ("kl_cov_ratio", "kl_cov_coef")}
        for loss, keys in owners.items():
            changed = [k for k in keys if getattr(self, k) != defaults[k]]
            if changed and self.policy_loss != loss:
                raise ConfigError(f"{changed[0]} is set but policy_loss={self.policy_loss}; "
                                  f"it applies to policy_loss={loss} only")
        if self.policy_loss != "ppo":
            for what, on in (("dual_clip", self.dual_clip is not None),
                             ("importance_sampling_level=sequence", self.importance_sampling_level != "token"),
                             ("trust_region=natural", self.trust_region != "clip")):
                if on:
                    raise ConfigError(f"policy_loss={self.policy_loss} with {what}: that goes with policy_loss=ppo "
                                      "only")
        if self.cispo_eps_high <= 0 or (self.cispo_eps_low is not None and not 0 < self.cispo_eps_low <= 1):
            raise ConfigError("need cispo_eps_high > 0 and 0 < cispo_eps_low <= 1 (or "
                              f"None), got {self.cispo_eps_high}, {self.cispo_eps_low}")
        if (not 0 < self.clip_cov_ratio <= 1 or self.clip_cov_lb >= self.clip_cov_ub
                or not 0 < self.kl_cov_ratio <= 1 or self.kl_cov_coef < 0):
            raise ConfigError("need 0 < clip_cov_ratio <= 1, clip_cov_lb < "
                              "clip_cov_ub, 0 < kl_cov_ratio <= 1 and kl_cov_coef >= 0")
        if self.teacher is not None and not get_estimator(self.estimator).kl_in_reward:
            raise ConfigError(f"teacher={self.teacher}: the distillation reward is per token, and "
                              f"estimator {self.estimator!r} broadcasts one advantage per "
                              "response: use reinforce_pp, reinforce_pp_baseline, reinforce or gae")
        if self.teacher is None and self.teacher_coef != 1.0:
            raise ConfigError("teacher_coef is set but teacher is not: name the teacher model with teacher=PATH")
        if self.task_size < 1 or self.reward_noise < 0:
            raise ConfigError(f"need task_size >= 1 and reward_noise >= 0, got {self.task_size}, {self.reward_noise}")

    @property
    def resolved_rollout_correction(self) -> str:
        """``rollout_correction``, with None resolved: truncate with asynchronous rollouts, else none."""
        if self.rollout_correction is not None:
            return self.rollout_correction
        return "truncate" if self.async_rollouts else "none"

    @classmethod
    def tiny(cls, **overrides) -> "LMConfig":
        """The built-in job's preset: the tiny model on a built-in task, sized to learn in
        minutes on a laptop CPU (with ``lora_rank > 0``: ``lr=2e-3``)."""
        preset = dict(
            total_steps=60, prompts_per_step=32, samples_per_prompt=8, micro_batch_size=64,
            lr=3e-4, max_new_tokens=8, kl_coef=0.01, eval_every=10, eval_samples=8, torch_threads=1,
            sft_steps=1000, sft_lr=3e-3, sft_wrong_fraction=0.75,
        )
        if overrides.get("task") == "tools":
            # two turns (a 21-token call, then the answer): longer episodes, fewer prompts
            preset.update(max_new_tokens=24, prompts_per_step=16, total_steps=40, max_turns=3, eval_max_prompts=100,
                          sft_steps=1500, sft_wrong_fraction=0.6)
        unset = (None, "None", "none", "")
        if overrides.get("train_data") not in unset or overrides.get("eval_data") not in unset:
            # your data on the tiny model: its warm start imitates the built-in tasks' demonstrations only
            preset.update(sft_steps=0, sft_wrong_fraction=0.0)
        if int(overrides.get("lora_rank", 0) or 0) > 0:
            preset["lr"] = 2e-3  # adapters want a larger step than full fine-tuning (docs/lm.md, LoRA)
        return cls.from_dict({**preset, **overrides})

    # --- derived sizes (computed in one place) ---------------------------------------------------
    @property
    def rollout_size(self) -> int:
        """Responses per step: ``prompts_per_step * samples_per_prompt``."""
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def mini_batch_responses(self) -> int:
        return self.mini_batch_size or self.rollout_size

    @property
    def on_policy(self) -> bool:
        """One epoch of one mini-batch: the update starts at the generating policy, so
        ``old_logprobs`` equal the update's own log-probs (detached) and need no extra pass."""
        return self.epochs == 1 and self.mini_batch_responses == self.rollout_size

    @property
    def resolved_kl_placement(self) -> str:
        if self.kl_placement is not None:
            return self.kl_placement
        return get_estimator(self.estimator).default_kl_placement

    @property
    def effective_kl_placement(self) -> str:
        """Where the KL term goes in this run: ``none`` when beta is 0 (fixed, or adaptive from 0:
        it stays 0), so that no reference loads and no reference forward runs; otherwise
        :attr:`resolved_kl_placement`."""
        return "none" if self.kl_coef == 0 else self.resolved_kl_placement

    @property
    def resolved_kl_estimator(self) -> KLEstimatorName:
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.resolved_kl_placement == "reward" else "k3"

    @property
    def resolved_loss_agg(self) -> LossAgg:
        return cast(LossAgg, self.loss_agg or get_estimator(self.estimator).default_loss_agg)

    @property
    def builtin_task(self) -> Optional[str]:
        """The built-in task this config runs: ``task``, or ``sort`` when no data is given;
        None for your own data. (A ``Trainer`` given datasets in Python runs no built-in task.)"""
        if self.task is not None:
            return self.task
        return "sort" if self.train_data is None and self.eval_data is None else None

    def resolved(self) -> dict:
        """The config with every None-means-default choice written out (saved in the run)."""
        d = self.to_dict()
        d.update(task=self.builtin_task, kl_placement=self.resolved_kl_placement,
                 kl_estimator=self.resolved_kl_estimator,
                 loss_agg=self.resolved_loss_agg, rollout_correction=self.resolved_rollout_correction)
        return d

    def validate(self) -> None:
        super().validate()
        if self.rollout_urls and self.engine == "hf":  # LMConfig(rollout_urls=...): the default engine becomes remote
            self.engine = "remote"
        spec = get_estimator(self.estimator) if self.estimator in ESTIMATORS else None
        if spec is None:
            raise ConfigError(f"unknown estimator {self.estimator!r}; valid: {', '.join(sorted(ESTIMATORS))}")
        if (not self.remote_timeout > 0 or self.remote_retries < 0 or self.remote_concurrency < 1
                or self.remote_batch_size < 1):
            raise ConfigError("need remote_timeout > 0, remote_retries >= 0, remote_concurrency >= 1 and "
                              f"remote_batch_size >= 1, got {self.remote_timeout}, {self.remote_retries}, "
                              f"{self.remote_concurrency}, {self.remote_batch_size}")
        positive = ("max_turns", "max_observation_tokens", "total_steps", "prompts_per_step", "samples_per_prompt",
                    "micro_batch_size", "epochs", "max_new_tokens", "max_filter_rounds", "eval_samples",
                    "logprob_chunk_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("save_every", "eval_every", "log_samples_every", "num_logged_samples", "warmup_steps",
                        "sft_steps", "top_k", "torch_threads", "weight_decay", "entropy_coef", "overlong_penalty",
                        "truncation_penalty")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "critic_lr", "sft_lr", "max_grad_norm", "reward_clip", "eval_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_prompt_length < 1 or self.sft_batch_size < 1 or self.kl_horizon < 1:
            raise ConfigError("max_prompt_length, sft_batch_size and kl_horizon must be >= 1")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ConfigError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if spec.needs_groups and self.samples_per_prompt < 2:
            raise ConfigError(f"estimator {self.estimator!r} compares samples of one prompt: "
                              f"it needs samples_per_prompt >= 2, got {self.samples_per_prompt}")
        if self.rollout_size % self.mini_batch_responses:
            raise ConfigError(f"mini_batch_size={self.mini_batch_responses} does not divide the rollout "
                              f"of prompts_per_step x samples_per_prompt = {self.rollout_size} responses")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 2:
            raise ConfigError("micro_batch_tokens must be >= 2 (a prompt token and "
                              f"a response token), got {self.micro_batch_tokens}")
        if (self.micro_batch_tokens is None and self.mini_batch_responses % self.micro_batch_size
                and self.mini_batch_responses > self.micro_batch_size):
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} does not "
                              f"divide mini_batch_size={self.mini_batch_responses}")
        placement = self.resolved_kl_placement
        if self.dynamic_filtering and self.samples_per_prompt < 2:
            raise ConfigError("dynamic_filtering drops groups whose samples all have the same "
                              "reward; with samples_per_prompt=1 every group would be "
                              "dropped: set samples_per_prompt >= 2 or dynamic_filtering=false")
        if self.kl_estimator == "k3+" and placement != "loss":
            raise ConfigError("kl_estimator=k3+ differs from k3 only in its gradient, "
                              f"which exists only with kl_placement=loss (here {placement})")
        if self.scale_rewards != "group" and self.estimator != "grpo":
            raise ConfigError(f"scale_rewards={self.scale_rewards} applies to estimator grpo "
                              f"only (here {self.estimator!r}, whose normalisation is fixed)")
        if self.ref_update_every < 0 or not 0 < self.ref_update_alpha <= 1:
            raise ConfigError("need ref_update_every >= 0 and 0 < ref_update_alpha <= "
                              f"1, got {self.ref_update_every}, {self.ref_update_alpha}")
        if self.ref_update_every and placement == "none":
            raise ConfigError("ref_update_every refreshes the reference, but kl_placement=none loads none")
        if self.ref_update_every and self.ref_model is not None and self.ref_model.startswith(("http://", "https://")):
            raise ConfigError("ref_update_every refreshes a local reference from the policy; "
                              "a served reference (ref_model=URL) cannot be refreshed")
        if placement == "reward" and not spec.kl_in_reward:
            raise ConfigError(f"estimator {self.estimator!r} broadcasts one advantage per response "
                              "and cannot carry KL in the reward; use kl_placement=loss or none")
        if spec.needs_critic is False and self.critic_model is not None:
            raise ConfigError(f"critic_model is set but estimator {self.estimator!r} trains no critic (only 'gae' "
                              "does)")
        if self.estimator == "reinforce_pp_baseline" and self.gamma != 1.0:
            raise ConfigError(f"reinforce_pp_baseline uses gamma = 1; got gamma={self.gamma}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.eps_low <= 0 or self.eps_low >= 1 or self.eps_high <= 0:
            raise ConfigError(f"need 0 < eps_low < 1 and eps_high > 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1, got {self.dual_clip}")
        self._validate_async()
        self._validate_natural()
        self._validate_losses()
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise ConfigError("kl_coef must be >= 0 and kl_target > 0")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        # Python-API reward_funcs: checked by the Trainer
        if self.reward_weights and self.reward_funcs and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"{len(self.reward_weights)} reward_weights for {len(self.reward_funcs)} reward_funcs")
        if self.reward_timeout is not None and not self.reward_timeout > 0:
            raise ConfigError(f"reward_timeout must be > 0 seconds (or None), got {self.reward_timeout}")
        if self.reward_step_delimiter == "":
            raise ConfigError("reward_step_delimiter must be a non-empty string (or None)")
        if self.share_prompt and self.gradient_checkpointing:
            raise ConfigError("share_prompt reuses the prompt's key/value cache, which "
                              "gradient checkpointing does not keep; set share_prompt=false")
        if self.torch_compile in ("decode", "all") and self.engine != "hf":
            raise ConfigError(f"torch_compile={self.torch_compile} compiles the hf engine's decoding step; "
                              f"engine={self.engine} samples another way: use torch_compile=update or engine=hf")
        if self.torch_compile in ("update", "all") and self.fsdp:
            raise ConfigError(f"torch_compile={self.torch_compile} with fsdp=true is not supported "
                              "here (untested); use torch_compile=decode or torch_compile=off")
        self._validate_scale()
        if not 0 <= self.sft_wrong_fraction <= 1:
            raise ConfigError(f"sft_wrong_fraction must be in [0, 1], got {self.sft_wrong_fraction}")
        if self.task is not None and (self.train_data is not None or self.eval_data is not None):
            given = ", ".join(f"{k}={getattr(self, k)}" for k in ("train_data", "eval_data")
                              if getattr(self, k) is not None)
            raise ConfigError(f"task={self.task} is a built-in task with its own generated "
                              f"data; it cannot be combined with {given}: drop task, or the data")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.overlong_buffer < 0 or self.overlong_buffer > self.max_new_tokens:
            raise ConfigError("overlong_buffer must be in [0, "
                              f"max_new_tokens={self.max_new_tokens}], got {self.overlong_buffer}")
        if self.resolved_kl_estimator not in KL_ESTIMATORS or self.resolved_loss_agg not in LOSS_AGGS:
            raise ConfigError(f"estimator {self.estimator!r} declares an invalid default")
        check_engine_config(self)
