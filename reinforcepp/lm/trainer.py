"""The language-model trainer: one loop for every advantage estimator.

Each step reads like ALGORITHM.md, "The training step"::

    rollout    = generate k samples for P prompts, score them        (generate, score)
    experience = old/ref log-probs, values; shaped rewards -> A      (forward)
    update     = epochs x mini-batches x micro-batches, clipped loss (update)
    log, evaluate, checkpoint

Only :meth:`Trainer.make_experience` knows which estimator runs, and it only passes its name to
:func:`reinforcepp.core.compute_advantages`. Everything else is shared.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, cast

import numpy as np
import torch
import yaml

from ..config import ConfigError
from ..errors import InputError, RunStopped
from ..core import (
    AdaptiveKLController,
    AdvantageInputs,
    AdvantageParams,
    FixedKLController,
    advantage_stats,
    aggregate,
    approx_kl,
    clip_fractions,
    compute_advantages,
    get_estimator,
    kl_loss,
    kl_return_share,
    logprob_mismatch,
    kl_penalty,
    masked_mean,
    mix_reference,
    overlong_penalty,
    pass_at_k,
    policy_loss,
    truncated_importance_weights,
    truncated_loss_mask,
    truncation_penalty,
    value_loss,
)
from ..remote import RemoteReference, is_url, settings_from
from ..rewards import TrainerState
from ..run import CheckpointManager, Progress, RunLogger, plot_run
from ..agents.rollout import episode_metrics, split_turn_rewards
from ..run.folder import RunDirError, claim_run_dir
from ..run.state import load_state, save_state
from .batch import collate
from .config import LMConfig
from .distributed import init_distributed
from .experience import Experience, batched_forward
from .fused import HeldForwards, fuse_old_logprobs
from .generation import Generation, SamplingParams, make_engine
from .logprobs import TokenLogprobs, response_logprobs
from .lora import AdaptersOff, add_lora, is_lora, load_lora, save_base
from .models import frozen, frozen_copy, load_causal_lm, load_critic, load_tokenizer, prompt_limit, resolve_device, resolve_dtype, set_torch_threads, weights_fingerprint
from .parallel import Parallel, check_launch
from .precision import autocast, autocast_dtype
from .profile import update_flops, update_tokens
from .sharded_checkpoint import rank_directory, write_policy

STATE_NAME = "trainer_state"
"""``trainer_state.safetensors`` + ``trainer_state.json`` in each checkpoint (:mod:`reinforcepp.run.state`)."""
REFERENCE_RECORD = "reference.json"
"""RUN_DIR/reference.json: the initial model's directory and the sha256 of its files, kept
instead of a copy when the reference is that directory unchanged."""


class NonFiniteError(RunStopped):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class Rollout:
    """Scored samples: ``N = groups * samples_per_prompt`` responses, prompt by prompt."""

    rows: list[dict]
    """one dataset row per response"""
    prompts: list[str]
    completions: list[str]
    generation: Generation
    rewards: torch.Tensor
    per_source: dict[str, torch.Tensor]
    counts: dict[str, float]
    token_rewards: Optional[list[list[float]]] = None
    """process rewards: per response, one weighted reward per response token (``None``: no
    process-reward source)"""

    def take(self, index: list[int]) -> "Rollout":
        """The responses at ``index``, in that order."""
        return Rollout(
            [self.rows[i] for i in index], [self.prompts[i] for i in index], [self.completions[i] for i in index],
            self.generation.take(index), self.rewards[index], {n: v[index] for n, v in self.per_source.items()}, dict(self.counts),
            None if self.token_rewards is None else [self.token_rewards[i] for i in index],
        )

    @staticmethod
    def concat(parts: list["Rollout"], counts: dict[str, float]) -> "Rollout":
        tokens = None if parts[0].token_rewards is None else [x for p in parts for x in (p.token_rewards or [])]
        return Rollout(
            [x for p in parts for x in p.rows], [x for p in parts for x in p.prompts], [x for p in parts for x in p.completions],
            Generation.concat([p.generation for p in parts]),
            torch.cat([p.rewards for p in parts]), {n: torch.cat([p.per_source[n] for p in parts]) for n in parts[0].per_source}, counts, tokens,
        )


class PhaseTimer:
    """Wall time per phase of a step (generate, score, forward, update, eval, save)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.clock = clock
        self._open: list[str] = []
        self._since = 0.0

    @contextlib.contextmanager
    def __call__(self, phase: str):
        """Time ``phase``; a phase opened inside another pauses the outer one, so each
        second is counted once (the update's forward run early counts as update, not forward)."""
        now = self.clock()
        if self._open:
            self.totals[self._open[-1]] += now - self._since
        self._open.append(phase)
        self._since = now
        try:
            yield
        finally:
            now = self.clock()
            self.totals[self._open.pop()] += now - self._since
            self._since = now

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.totals.items()}
        self.totals.clear()
        return out


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(config: LMConfig, total_optimizer_steps: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup_steps``, then constant or cosine down to ``lr_min_ratio``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_optimizer_steps - config.warmup_steps))
        return config.lr_min_ratio + (1 - config.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


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

    def __init__(
        self,
        config: LMConfig,
        *,
        model: Optional[torch.nn.Module] = None,
        tokenizer: Any = None,
        reward_funcs: Optional[Sequence[Any]] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        ref_model: Optional[torch.nn.Module | RemoteReference] = None,
        env: Optional[Callable[[], Any]] = None,
    ) -> None:
        config.validate()
        self.config = config
        self.spec = get_estimator(config.estimator)
        # beta = 0 (fixed, or adaptive from 0: it stays 0) makes the KL term zero: no reference model, no reference forward
        self.kl_placement = "none" if config.kl_coef == 0 else config.resolved_kl_placement
        self.kl_estimator = config.resolved_kl_estimator
        self.loss_agg = config.resolved_loss_agg
        self._setup_torch()
        given_data = train_dataset is not None or eval_dataset is not None
        if given_data and config.task is not None:
            raise ConfigError(f"task={config.task} is a built-in task with its own data; it cannot be combined with train_dataset/eval_dataset")
        self.builtin_task = None if given_data else config.builtin_task
        self.run_dir = Path(config.output_dir or self._default_run_dir())
        if int(os.environ.get("RANK", "0")) == 0:  # rank 0 owns the run folder
            claim_run_dir(self.run_dir, resume=config.resume, overwrite=config.overwrite)
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=config.keep_last)
        resume_from = self.checkpoints.latest_intact() if config.resume else None
        if config.resume and resume_from is None:
            raise RunDirError(f"resume=true but {self.run_dir} holds no complete checkpoint")
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.dist.rank)))
        check_launch(config.fsdp, config.ref_offload, self.dist.world_size)
        if config.prompts_per_step % self.dist.world_size:
            raise ConfigError(f"prompts_per_step={config.prompts_per_step} does not split over {self.dist.world_size} ranks")
        self.prompts_per_rank = config.prompts_per_step // self.dist.world_size
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.parallel = Parallel(self.dist, self.device, fsdp=config.fsdp, compute_dtype=self.dtype, ref_offload=config.ref_offload, full_finetune=not config.lora_rank)
        # None = off; dtype=bfloat16 without FSDP computes under autocast over float32 master weights
        self.autocast_dtype = autocast_dtype(config.autocast, self.device) or self.parallel.autocast_dtype
        self.timer = PhaseTimer()

        self.env_factory = self._load_env_factory(env)
        self.tokenizer, self.policy = self._load_policy(model, tokenizer, resume_from)
        self.eval_source = ""  # where the held-out prompts come from, said by `reinforcepp eval`
        self.eval_pass_fail = False  # every reward of the last evaluation was 0 or 1
        self.lora = bool(config.lora_rank) or is_lora(self.policy)  # a PEFT model passed in trains as LoRA too
        self.train_data, self.eval_data = self._load_data(train_dataset, eval_dataset)
        self.scorer = self._load_rewards(reward_funcs)
        if config.sft_steps and resume_from is None and model is None and config.model is None:
            self._warm_start()
        self.ref_model = self._load_reference(ref_model, resume_from, model)
        if self.lora:  # adapters on the (warm-started) base; the reference is the base with them off
            if not is_lora(self.policy):
                self.policy = add_lora(self.policy, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=config.lora_target_modules)
            self.ref_model = AdaptersOff(self.policy) if self.kl_placement != "none" else None
        if self.dist.enabled:  # identical initial weights on every rank, then different samples
            set_seed(config.seed + 100_003 * self.dist.rank)
        self.critic = load_critic(config.critic_model, self.policy, dtype=self.parallel.master_dtype, device=self.parallel.load_device, trust_remote_code=config.trust_remote_code) if self.spec.needs_critic else None
        if config.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # How the models are held (one process, DDP, FSDP2): the train_* modules run the training forwards.
        self.train_policy = self.parallel.trained(self.policy)
        if config.torch_compile in ("update", "all"):  # the update's forward (and so its backward); shapes vary per step
            self.train_policy = cast(torch.nn.Module, torch.compile(self.train_policy, dynamic=True))
        self.train_critic = self.parallel.trained(self.critic) if self.critic is not None else None
        self.ref_model = self.parallel.frozen(self.ref_model)
        self.policy_weights = self.parallel.weights(self.policy)  # what the engine loads after each update (gathered, LoRA merged)
        self.engine = make_engine(config.engine, self.policy, self.tokenizer, self.device, config=config)
        self.weights_changed = False  # an optimizer step changed the policy since the engine's last sync
        self.episodes = self._episode_runner()

        from .data import PromptLoader

        # None: evaluation only (eval_data without train_data); train() then says what is missing
        self.loader = PromptLoader(self.train_data, config.prompts_per_step, seed=config.seed) if self.train_data is not None else None
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
        self.num_mini_batches = config.rollout_size // config.mini_batch_responses
        total_opt_steps = config.total_steps * config.epochs * self.num_mini_batches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, total_opt_steps))
        self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=config.critic_lr) if self.critic is not None else None
        self.kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.kl_target else FixedKLController(config.kl_coef)
        self.n_params = sum(p.numel() for p in self.policy.parameters())
        self.held = HeldForwards()  # the update's forwards, run early when old_logprobs come from them
        self.fuse_old = fuse_old_logprobs(config.fuse_old_logprobs, config.on_policy, self.kl_placement == "reward", self.prompts_per_rank * config.samples_per_prompt, config.micro_batch_size)
        self.fuse_old = self.fuse_old and self.parallel.can_hold_forwards(math.ceil(self.prompts_per_rank * config.samples_per_prompt / config.micro_batch_size))
        self.step = 0
        self.nonfinite_in_a_row = 0
        self._warned_kl_share = False
        self.nonfinite_total = 0
        self.tokens_total = 0
        self._prompt_ids_cache: dict[str, list[int]] = {}
        self.prompts_truncated = 0
        if resume_from is not None:
            self._load_state(resume_from)
        self.logger: Optional[RunLogger] = None  # rank 0 writes the run directory
        if self.dist.is_main:
            resolved = {**config.resolved(), "task": self.builtin_task}
            self.logger = RunLogger(self.run_dir, resolved, tensorboard=config.tensorboard, wandb_project=config.wandb_project)
            if resume_from is not None:
                self.logger.truncate(self.step)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    # ------------------------------------------------------------------ setup
    def _setup_torch(self) -> None:
        import datasets
        import transformers

        datasets.disable_progress_bars()  # our own bar shows progress; theirs only adds noise
        transformers.utils.logging.disable_progress_bar()
        set_torch_threads(self.config.torch_threads)
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True)
        set_seed(self.config.seed)

    def _default_run_dir(self) -> str:
        cfg = self.config
        data = cfg.train_data or cfg.eval_data
        what = self.builtin_task or (Path(data).stem if data else "custom")
        return f"runs/{what}-{self.config.estimator}-{time.strftime('%Y%m%d-%H%M%S')}"

    def _load_policy(self, model, tokenizer, resume_from: Optional[Path]):
        cfg = self.config
        dtype, device = self.parallel.master_dtype, self.parallel.load_device
        if resume_from is not None and (resume_from / "adapter").exists():  # the base the adapters were trained on, then the adapter
            base = cfg.model or str(self.run_dir / "reference")
            tok = tokenizer or load_tokenizer(cfg.tokenizer or base, cfg.trust_remote_code)
            return tok, load_lora(load_causal_lm(base, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code), resume_from / "adapter")
        if resume_from is not None:
            tok = tokenizer or load_tokenizer(str(resume_from / "model"), cfg.trust_remote_code)
            return tok, load_causal_lm(str(resume_from / "model"), dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code, safetensors_only=True)
        if model is not None:
            if tokenizer is None:
                raise ValueError("Trainer(model=...) needs tokenizer=... as well")
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return tokenizer, model.to(device)
        if cfg.model is not None:
            tok = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
            return tok, load_causal_lm(cfg.model, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)
        from .tasks import ALPHABET, build_char_tokenizer, build_tiny_model, get_task

        tok = tokenizer or build_char_tokenizer(get_task(self.builtin_task).alphabet if self.builtin_task else ALPHABET)
        return tok, build_tiny_model(tok, seed=cfg.seed).to(device=device, dtype=dtype)

    def _load_data(self, train_dataset, eval_dataset):
        from .data import load_prompt_dataset, split_eval

        cfg = self.config
        if self.builtin_task is not None:
            from .tasks import get_task, write_task_files

            train_path, eval_path = self.run_dir / "data" / "train.jsonl", self.run_dir / "data" / "eval.jsonl"
            if self.dist.is_main:
                write_task_files(get_task(self.builtin_task), self.run_dir / "data", n_train=5000, n_eval=cfg.eval_max_prompts, seed=cfg.seed, wrong_fraction=cfg.sft_wrong_fraction)
            self.dist.barrier()
            train_dataset, eval_dataset = str(train_path), str(eval_path)
        trains = train_dataset if train_dataset is not None else cfg.train_data
        evals = eval_dataset if eval_dataset is not None else cfg.eval_data
        train = load_prompt_dataset(trains, prompt_column=cfg.prompt_column) if trains is not None else None
        if evals is not None:
            held_out = load_prompt_dataset(evals, prompt_column=cfg.prompt_column)
            self.eval_source = f"the built-in task {self.builtin_task!r}" if self.builtin_task else (str(evals) if isinstance(evals, (str, Path)) else "eval_dataset")
            return train, held_out
        if train is None:
            raise ConfigError("no data: set train_data (and eval_data), or pass train_dataset=...")
        self.eval_source = f"eval_fraction={cfg.eval_fraction} of {trains if isinstance(trains, (str, Path)) else 'train_dataset'}"
        return split_eval(train, cfg.eval_fraction, cfg.seed)

    def _load_rewards(self, reward_funcs):
        from ..rewards import RewardConfigError, RewardScorer, RewardSource, load_reward_source
        from ..rewards.remote import connect_remote_reward

        cfg = self.config
        funcs = list(reward_funcs) if reward_funcs is not None else list(cfg.reward_funcs)
        if not funcs:
            if self.builtin_task is None:
                if self.env_factory is not None:
                    return None  # the environment's rewards only
                raise ConfigError("no reward: set reward_funcs (module:function, path/file.py:function, rm:MODEL, http://...) or pass reward_funcs=[...]")
            from .tasks import char_match, get_task

            funcs = [get_task(self.builtin_task).reward or char_match]
        weights = list(cfg.reward_weights) or [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ConfigError(f"{len(weights)} reward_weights for {len(funcs)} reward functions")
        sources = []
        for fn, w in zip(funcs, weights):
            if is_url(fn):
                sources.append(RewardSource(fn, connect_remote_reward(fn, settings_from(cfg), cfg.remote_batch_size), w))
            elif isinstance(fn, str):
                sources.append(load_reward_source(fn, weight=w))
            elif isinstance(fn, RewardSource):
                sources.append(fn)
            else:
                sources.append(RewardSource(getattr(fn, "__name__", type(fn).__name__), fn, w))
        scorer = RewardScorer(sources, on_error=cfg.reward_on_error, timeout=cfg.reward_timeout)
        try:  # a reward needing a column the data lacks fails now, not at the first step
            data = self.train_data if self.train_data is not None else self.eval_data  # eval_data alone: `reinforcepp eval`
            scorer.check_columns([c for c in data.column_names if c != cfg.prompt_column])
        except RewardConfigError as exc:
            raise ConfigError(str(exc)) from exc
        return scorer

    def _warm_start(self) -> None:
        """Supervised warm start on the built-in task's demonstrations (``sft_steps`` steps)."""
        from .data import render_prompt
        from .sft import sft_train

        cfg = self.config
        rows = self.train_data
        if self.builtin_task is None:
            raise ConfigError("sft_steps > 0 warm-starts on the built-in tasks only; for your data run `reinforcepp sft` first and set sft_steps=0")
        prompts = [render_prompt(self.tokenizer, p, cfg.use_chat_template) for p in rows[cfg.prompt_column]]
        bar = Progress(cfg.sft_steps, desc="warm start (sft)", keys={"loss": "loss"}, enabled=cfg.progress and self.dist.is_main)
        if self.env_factory is not None:  # multi-turn demonstrations
            from ..agents.sft import warm_start_episodes

            warm_start_episodes(self, prompts, on_step=lambda _, loss: bar.update({"loss": loss}))
            return bar.close()
        sft_train(self.policy, self.tokenizer, prompts, list(rows["demonstration"]), steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=cfg.seed, on_step=lambda _, loss: bar.update({"loss": loss}))
        bar.close()

    def _load_env_factory(self, env):
        if env is not None:
            return env
        if self.config.environment is not None:
            from ..agents import load_environment

            return load_environment(self.config.environment)
        if self.builtin_task is not None:
            from .tasks import get_task

            return get_task(self.builtin_task).environment
        return None

    def _episode_runner(self):
        """Multi-turn episodes through the same engine, when there is an environment."""
        if self.env_factory is None:
            return None
        from ..agents import EpisodeRunner
        from .data import has_chat_template, render_prompt

        cfg = self.config
        chat = cfg.use_chat_template and has_chat_template(self.tokenizer)
        return EpisodeRunner(self.env_factory, self.engine, self.tokenizer, render=lambda p: render_prompt(self.tokenizer, p, cfg.use_chat_template),
                             encode=self._encode_prompt, max_turns=cfg.max_turns, max_observation_tokens=cfg.max_observation_tokens, chat=chat, prompt_column=cfg.prompt_column)

    def _load_reference(self, ref_model, resume_from: Optional[Path], model: Optional[torch.nn.Module] = None):
        cfg = self.config
        if self.kl_placement == "none" and not self.lora:
            if cfg.kl_coef == 0 and cfg.resolved_kl_placement != "none" and self.dist.is_main:
                print(f"kl_coef=0: the KL term ({cfg.resolved_kl_placement}) is zero, so no reference model is loaded and no reference forward runs", file=sys.stderr)
            return None
        if ref_model is None and is_url(cfg.ref_model):
            ref_model = RemoteReference(cfg.ref_model, settings_from(cfg), temperature=cfg.temperature, batch_size=cfg.remote_batch_size)
        if isinstance(ref_model, RemoteReference):  # same interface: make_experience does not know
            if cfg.ref_update_every:
                raise ConfigError("ref_update_every refreshes a local reference from the policy; a served reference (ref_model=URL) cannot be refreshed")
            if ref_model.temperature != cfg.temperature:
                raise ConfigError(f"RemoteReference(temperature={ref_model.temperature}) but temperature={cfg.temperature}: reference log-probs must use the sampling temperature")
            ref_model.connect(self.policy, self.tokenizer)
            return ref_model
        if ref_model is not None:
            return frozen(ref_model.to(self.device))
        if cfg.ref_model is not None:
            return frozen(load_causal_lm(cfg.ref_model, dtype=self.dtype, device=self.parallel.load_device, trust_remote_code=cfg.trust_remote_code))
        saved, record = self.run_dir / "reference", self.run_dir / REFERENCE_RECORD
        if resume_from is not None and (resume_from / "reference").exists():  # refreshed by ref_update_every
            return frozen(load_causal_lm(str(resume_from / "reference"), dtype=self.dtype, device=self.parallel.load_device, safetensors_only=True))
        if resume_from is not None:
            if self.lora:  # the base the adapters resume on is loaded in _load_policy
                return None
            return frozen(self._reload_reference(saved, record))
        # The reference is the initial policy (after any warm start). A resumed run must use the
        # same one: when the policy came unchanged from a local directory, a record of that
        # directory (path and sha256 of its files) is enough; otherwise a copy is saved
        # (under LoRA: the base its adapters are resumed on).
        if self.dist.is_main:
            if model is None and cfg.model is not None and Path(cfg.model).is_dir():
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps({"path": str(Path(cfg.model).resolve()), "sha256": weights_fingerprint(cfg.model)}, indent=1))
            elif not (self.lora and cfg.model):
                save_base(self.policy, saved)
                self.tokenizer.save_pretrained(saved)  # so that `reinforcepp serve reference --model RUN/reference` can check the tokenizer
        return None if self.lora else frozen_copy(self.policy)

    def _reload_reference(self, saved: Path, record: Path) -> torch.nn.Module:
        """The reference of a resumed run: its saved copy, or the recorded initial directory
        when its files are unchanged."""
        if saved.exists():
            return load_causal_lm(str(saved), dtype=self.dtype, device=self.parallel.load_device, safetensors_only=True)
        if not record.exists():
            raise RunDirError(f"cannot resume: neither the reference copy {saved} nor its record {record} exists")
        info = json.loads(record.read_text())
        path = info["path"]
        if not Path(path).is_dir() or weights_fingerprint(path) != info["sha256"]:
            raise RunDirError(f"cannot resume: the reference is the initial model {path}, whose files have changed or gone since the run started "
                                    f"(sha256 recorded in {record}); restore them, or set ref_model=PATH to use another reference")
        return load_causal_lm(path, dtype=self.dtype, device=self.parallel.load_device, trust_remote_code=self.config.trust_remote_code)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        """Run until ``total_steps``; returns the last evaluation's metrics."""
        cfg = self.config
        self._train_loader()
        last_eval: dict[str, float] = {}
        bar = Progress(cfg.total_steps, initial=self.step, desc=f"{cfg.estimator}", enabled=cfg.progress and self.dist.is_main,
                       keys={"reward/mean": "reward", "kl/mean_token": "kl", "eval/accuracy": "acc", "tokens_per_s": "tok/s"})
        # Rank 0 evaluates; under FSDP every rank does (gathering the sharded weights is collective), rank 0 logs.
        evaluates = cfg.eval_every and self.eval_data is not None and (self.dist.is_main or self.parallel.sharded)
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
                    with self.timer("save"):
                        self.save_checkpoint()
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
        if self.dist.is_main:
            plot_run(self.run_dir)
        if cfg.profile:
            self.print_profile()
        return last_eval

    def print_profile(self) -> None:
        """Time per phase, tokens/s and the update's FLOP/s utilisation over the run so far."""
        from ..run import read_metrics
        from .profile import matmul_flops_per_s, summary

        rows = [r for r in read_metrics(self.run_dir) if r.get("kind") == "train"]
        print(summary(rows, matmul_flops_per_s(dtype=self.autocast_dtype or self.dtype, device=self.device)))

    def train_step(self) -> dict[str, float]:
        """One RL step: rollout, experience, update, log."""
        self.step += 1
        rollout = self.rollout()
        self.engine.sleep()
        with self.timer("forward"):
            experience = self.make_experience(rollout)
        update_metrics = self.update(experience)
        if self.config.ref_update_every and self.step % self.config.ref_update_every == 0 and self.ref_model is not None:
            mix_reference(self.ref_model.parameters(), self.policy.parameters(), self.config.ref_update_alpha)
            update_metrics["kl/ref_updated"] = 1.0
        self.sync_engine()
        metrics = {**self.rollout_metrics(rollout, experience), **update_metrics}
        metrics.update(self.timer.pop())
        metrics["perf/update_flops_per_s"] = update_flops(self.n_params, update_tokens(experience.batch, self.config.micro_batch_size, self.config.share_prompt) * self.config.epochs) / max(1e-9, metrics["time/update"])
        metrics = self.dist.reduce_metrics(metrics)  # tokens summed over ranks, times of the slowest rank
        metrics["tokens_per_s"] = metrics["response/tokens"] / max(1e-9, sum(v for k, v in metrics.items() if k.startswith("time/")))
        # beta follows the global KL, so every rank keeps the same coefficient
        metrics["kl/beta_next"] = self.kl_controller.update(metrics.get("kl/mean_sequence", 0.0), int(self.dist.sum(float(len(experience)))))
        if self.logger is not None:
            self.logger.log(self.step, metrics)
            self._warn_kl_share(metrics.get("kl/return_share", 0.0))
        if self.config.log_samples_every and self.step % self.config.log_samples_every == 0 and self.dist.is_main:
            self._log_samples(rollout)
        return metrics

    def _warn_kl_share(self, share: float) -> None:
        """Once per run: the KL penalty makes up more of the return than the task reward."""
        if share <= 0.5 or self._warned_kl_share:
            return
        self._warned_kl_share = True
        cfg = self.config
        print(f"reinforcepp: warning: at step {self.step} the KL penalty is {share:.0%} of the return (kl/return_share), more than the task reward: "
              f"the policy gains more by staying near the reference than by solving the task. Lower kl_coef (now {cfg.kl_coef}), "
              f"or move the KL out of the reward (kl_placement=loss or none); see docs/lm.md, 'Choosing the KL'.", file=sys.stderr)

    def sync_engine(self) -> None:
        """Give the engine the updated weights (once per step, after its last optimizer step:
        nothing samples in between); skipped when every optimizer step was skipped."""
        if self.weights_changed:
            with self.timer("sync"):
                self.engine.sync_weights(self.policy, self.policy_weights)
            self.weights_changed = False

    # ------------------------------------------------------------------ rollout
    def _train_loader(self):
        if self.loader is None:
            raise ConfigError("no training data: train_data is not set (eval_data alone is enough for evaluate(), not for train())")
        return self.loader

    def _encode_prompt(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (cached: prompts recur every epoch). A prompt longer
        than :func:`~.models.prompt_limit` is refused, or cut to its last tokens with
        ``truncate_prompts`` (counted)."""
        if text not in self._prompt_ids_cache:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            limit = prompt_limit(self.policy, self.config.max_prompt_length, self.config.max_new_tokens)
            if len(ids) > limit:
                if not self.config.truncate_prompts:
                    raise InputError(f"a prompt has {len(ids)} tokens > {limit} allowed (max_prompt_length, or the model's context minus max_new_tokens); "
                                     f"shorten it or set truncate_prompts=true: {text[:60]!r}")
                ids = ids[len(ids) - limit :]
                self.prompts_truncated += 1
            self._prompt_ids_cache[text] = ids
        return self._prompt_ids_cache[text]

    def _sampling(self, greedy: bool = False, temperature: Optional[float] = None) -> SamplingParams:
        cfg = self.config
        return SamplingParams(cfg.max_new_tokens, temperature or cfg.temperature, cfg.top_p, cfg.top_k, greedy)

    def _generate_and_score(self, rows: list[dict], k: int, params: SamplingParams, timer: Optional[PhaseTimer] = None):
        from .data import columns_of, render_prompt

        cfg = self.config
        timer = timer or self.timer
        if self.episodes is not None:  # multi-turn: the environment plays the other side
            from ..agents.rollout import score_episodes

            with timer("generate"):
                prompts, gen = self.episodes.run(rows, k, params)
            with timer("score"):
                expanded = [r for r in rows for _ in range(k)]
                return gen, prompts, gen.episodes.final_texts, expanded, score_episodes(self.scorer, prompts, gen, columns_of(expanded, exclude=(cfg.prompt_column,)))
        rendered = [render_prompt(self.tokenizer, r[cfg.prompt_column], cfg.use_chat_template) for r in rows]
        with timer("generate"), self.precision(), self.parallel.full_weights(self.policy):
            gen = self.engine.generate([self._encode_prompt(text) for text in rendered], k, params)
        with timer("score"):
            prompts = [text for text in rendered for _ in range(k)]
            completions = self.tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
            expanded = [r for r in rows for _ in range(k)]
            chat = [r[cfg.prompt_column] for r in expanded] if rows and not isinstance(rows[0][cfg.prompt_column], str) else None
            state = TrainerState(global_step=max(0, self.step - 1), max_steps=cfg.total_steps, epoch=max(0, self.step - 1) / cfg.total_steps)
            result = self.scorer(prompts, completions, columns_of(expanded, exclude=(cfg.prompt_column,)), completion_ids=[list(r) for r in gen.response_ids], trainer_state=state, chat_prompts=chat)
        return gen, prompts, completions, expanded, result

    def rollout(self) -> Rollout:
        """Generate ``samples_per_prompt`` responses for ``prompts_per_step`` prompts and score
        them. Groups with a dropped sample (reward error, ``reward_on_error=drop``) are removed;
        with ``dynamic_filtering`` so are groups whose rewards are all equal, and more prompts
        are sampled (up to ``max_filter_rounds`` rounds) to refill the batch."""
        cfg = self.config
        k = cfg.samples_per_prompt
        kept: list[Rollout] = []  # one whole group each
        counts = dict.fromkeys(("reward/dropped_samples", "reward/dropped_groups", "filter/dropped_groups"), 0.0)
        mine = slice(self.dist.rank * self.prompts_per_rank, (self.dist.rank + 1) * self.prompts_per_rank)
        round_ = 0
        for round_ in range(1, (cfg.max_filter_rounds if cfg.dynamic_filtering else 1) + 1):  # noqa: B007 (reported after the loop)
            gen, prompts, completions, rows, result = self._generate_and_score(self._train_loader().next_batch()[mine], k, self._sampling())
            scored = Rollout(rows, prompts, completions, gen, result.rewards + self._length_penalties(gen), result.per_source, {}, self._process_rewards(result, gen, completions))
            counts["reward/dropped_samples"] += float(result.dropped.sum())
            counts["reward/unscored_samples"] = counts.get("reward/unscored_samples", 0.0) + float(result.unscored.sum() if result.unscored is not None else 0)
            for key, value in result.extras.items():  # verl's extra keys, OpenRLHF's extra_logs (first round)
                counts.setdefault(f"reward/{key}", value)
            for start in range(0, len(rows), k):
                group = list(range(start, start + k))
                if bool(result.dropped[group].any()):
                    counts["reward/dropped_groups"] += 1
                elif cfg.dynamic_filtering and k > 1 and bool((scored.rewards[group] == scored.rewards[start]).all()):
                    counts["filter/dropped_groups"] += 1
                else:
                    kept.append(scored.take(group))
            if len(kept) >= self.prompts_per_rank:
                break
        counts["filter/rounds"] = round_
        if not kept:
            raise RuntimeError(f"step {self.step}: every group was dropped (reward errors or all-equal rewards); nothing to train on")
        return Rollout.concat(kept[: self.prompts_per_rank], counts)

    def _process_rewards(self, result, gen: Generation, completions: list[str]) -> Optional[list[list[float]]]:
        """Weighted per-token rewards of the process-reward sources, one list per response."""
        if not result.token_rewards:
            return None
        from ..rewards.process import process_token_rewards

        if not self.spec.kl_in_reward:
            raise ConfigError(f"reward source(s) {sorted(result.token_rewards)} return per-token/per-step rewards, but estimator {self.config.estimator!r} broadcasts one advantage per response; use reinforce_pp, reinforce or gae")
        weights = {s.name: s.weight for s in self.scorer.sources}
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        out = [[0.0] * len(ids) for ids in gen.response_ids]
        for name, per_sample in result.token_rewards.items():
            where = self.scorer.where(next(s for s in self.scorer.sources if s.name == name))
            for i, values in enumerate(per_sample):
                if values is not None and not bool(result.dropped[i]):
                    tokens = process_token_rewards(values, completions[i], gen.response_ids[i], decode, self.config.reward_step_delimiter, where)
                    out[i] = [a + weights[name] * b for a, b in zip(out[i], tokens)]
        return out

    def _length_penalties(self, gen: Generation) -> torch.Tensor:
        cfg = self.config
        lengths = torch.tensor([sum(m) for m in gen.response_masks] if gen.response_masks is not None else [len(r) for r in gen.response_ids])  # the model's tokens
        penalty = torch.zeros(len(lengths))
        if cfg.overlong_buffer:
            penalty += overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        if cfg.truncation_penalty:
            penalty += truncation_penalty(gen.truncated, cfg.truncation_penalty)
        return penalty

    # ------------------------------------------------------------------ experience
    def _logprob_fn(self, model):
        """``(input_ids, attention_mask, T) -> (B, T)`` log-probs under ``model``: a local causal
        LM, or a reference that computes them itself (:class:`RemoteReference`)."""
        cfg = self.config
        if isinstance(model, RemoteReference):
            return model.response_logprobs
        return lambda ids, attn, t: response_logprobs(model, ids, attn, t, chunk_size=cfg.logprob_chunk_size, temperature=cfg.temperature, share_prompt=cfg.share_prompt).logprobs

    def make_experience(self, rollout: Rollout) -> Experience:
        """Forward passes without gradient, then shaped rewards, returns and advantages."""
        cfg = self.config
        gen = rollout.generation
        batch = collate(gen.prompt_ids, gen.response_ids, self.tokenizer.pad_token_id, response_masks=gen.response_masks)
        mb = cfg.micro_batch_size
        need_old = not cfg.on_policy or self.kl_placement == "reward"
        old: Optional[torch.Tensor] = None
        if need_old and self.fuse_old:  # the update's own forward, run now (fused.py)
            with self.timer("update"):
                old = self.held.run(self._policy_forward, batch, mb)
        else:
            self.policy.eval()
            with self.precision():
                old = batched_forward(self._logprob_fn(self.policy), batch, mb, self.device) if need_old else None
            self.policy.train()
        with self.precision():
            ref = batched_forward(self._logprob_fn(self.ref_model), batch, mb, self.device) if self.ref_model is not None else None
            values = batched_forward(lambda i, a, t: self.critic(i, a, t), batch, mb, self.device) * batch.response_mask if self.critic is not None else None
        kl = None
        if self.kl_placement == "reward":
            assert old is not None and ref is not None  # reward KL computes both
            kl = kl_penalty(old, ref, self.kl_estimator) * batch.response_mask
        steps = None
        if rollout.token_rewards is not None:
            steps = torch.zeros_like(batch.response_mask)
            for i, row in enumerate(rollout.token_rewards):
                steps[i, : len(row)] = torch.tensor(row[: steps.shape[1]])
        rewards, turn_steps = split_turn_rewards(rollout.rewards, gen, batch.response_length, self.spec.kl_in_reward)  # multi-turn: per-turn rewards
        if turn_steps is not None:
            steps = turn_steps if steps is None else steps + turn_steps
        inputs = AdvantageInputs(rewards, batch.response_mask, cfg.samples_per_prompt, kl=kl, values=values, step_rewards=steps)
        params = AdvantageParams(gamma=cfg.gamma, lam=cfg.lam, kl_coef=self.kl_controller.value, reward_clip=cfg.reward_clip, whiten=cfg.rloo_whiten, scale_rewards=cfg.scale_rewards, reduce=self.dist.reduce)
        adv = compute_advantages(cfg.estimator, inputs, params)
        loss_mask = truncated_loss_mask(batch.response_mask, rollout.generation.truncated) if cfg.mask_truncated_completions else None
        sampler = rollout.generation.sampler_logprob_tensor(batch.response_length)
        if cfg.tis_cap is not None and sampler is None:
            raise ConfigError(f"tis_cap needs the log-probs the engine sampled with, and engine {cfg.engine!r} does not return them; unset tis_cap")
        return Experience(batch, rollout.rewards, adv.advantages, adv.returns, old, ref, values, kl, loss_mask=loss_mask, sampler_logprobs=sampler)

    # ------------------------------------------------------------------ update
    def update(self, exp: Experience) -> dict[str, float]:
        """``epochs`` passes; each mini-batch is one optimizer step accumulated over
        micro-batches, with the loss normalised by the mini-batch's token/sequence counts so
        that the accumulated gradient equals the full mini-batch gradient."""
        cfg = self.config
        seen: dict[str, list[torch.Tensor]] = defaultdict(list)
        scalars: dict[str, list[float]] = defaultdict(list)
        with self.timer("update"):
            for _epoch in range(cfg.epochs):
                order = self._shuffled_groups(len(exp)) if cfg.epochs > 1 or self.num_mini_batches > 1 else torch.arange(len(exp))
                for window in order.tensor_split(self.num_mini_batches):
                    self._optimizer_step(exp.select(window), seen, scalars)
        mask = torch.cat(seen["mask"])
        logp, old = torch.cat(seen["logprobs"]), torch.cat(seen["old_logprobs"])
        low, high = clip_fractions(torch.cat(seen["clipped_low"]), torch.cat(seen["clipped_high"]), mask)
        mean = lambda key: float(np.mean(scalars[key])) if scalars[key] else float("nan")  # noqa: E731
        out = {
            "loss/policy": mean("loss/policy"),
            "clip/frac_low": low,
            "clip/frac_high": high,
            "approx_kl": approx_kl(logp, old, mask),
            "entropy": float(masked_mean(torch.cat(seen["entropy"]), mask)),
            "grad_norm": mean("grad_norm"),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "nonfinite/skipped_steps": float(self.nonfinite_total),
        }
        if seen["sampler_logprobs"]:  # sampler vs trainer: the same tokens, two sets of numerics
            sampler = torch.cat(seen["sampler_logprobs"])
            out["rollout/logprob_abs_diff_mean"], out["rollout/logprob_abs_diff_max"] = logprob_mismatch(old, sampler, mask, self.dist.reduce)
            if cfg.tis_cap is not None:
                out["rollout/tis_weight_mean"] = float(masked_mean(truncated_importance_weights(old, sampler, cfg.tis_cap), mask))
        if self.kl_placement == "loss":
            out["kl/mean_token"] = float(masked_mean(torch.cat(seen["kl"]), mask))
            out["kl/mean_sequence"] = float((torch.cat(seen["kl"]) * mask).sum() / mask.shape[0])
        for key in ("loss/kl", "loss/entropy_bonus", "loss/value", "critic/grad_norm"):
            if scalars[key]:
                out[key] = mean(key)
        if scalars["loss/empty_windows"]:
            out["loss/empty_windows"] = float(len(scalars["loss/empty_windows"]))
        return out

    def _shuffled_groups(self, n: int) -> torch.Tensor:
        """A random order of the ``n`` responses that keeps each prompt's samples together, so
        micro-batches hold whole groups and ``share_prompt`` computes each prompt once."""
        k = self.config.samples_per_prompt
        groups = torch.randperm(n // k)
        return (groups[:, None] * k + torch.arange(k)).flatten()

    def _optimizer_step(self, window: Experience, seen, scalars) -> None:
        cfg = self.config
        if len(window) == 0 and not self.dist.enabled:
            return  # dynamic filtering left fewer responses than mini-batches
        lm = window.loss_mask_or_response_mask
        n_tokens = self.dist.sum(float(lm.sum()))  # the global window's counts
        n_seqs = self.dist.sum(float((lm.sum(1) > 0).sum()))
        if n_tokens == 0:  # mask_truncated_completions left no token of this window in the loss
            scalars["loss/empty_windows"].append(1.0)
            return
        total = torch.zeros(())
        starts = {key: len(scalars[key]) for key in ("loss/kl", "loss/entropy_bonus")}
        with self.parallel.accumulate(self.train_policy, self.train_critic):  # DDP/FSDP2 reduce the gradients in backward
            for micro in torch.arange(len(window)).split(cfg.micro_batch_size):
                part = window.select(micro)
                loss = self._micro_loss(part, n_tokens, n_seqs, seen, scalars)
                (loss * self.parallel.loss_scale).backward()
                total = total + loss.detach()
                if self.critic is not None:
                    self._critic_backward(part, n_tokens, n_seqs, scalars)
        for key, on in (("loss/kl", self.kl_placement == "loss"), ("loss/entropy_bonus", bool(cfg.entropy_coef))):
            if on:  # the micro-batch parts of a term (on every rank) add up to the window's term
                scalars[key][starts[key]:] = [self.dist.sum(float(sum(scalars[key][starts[key]:])))]
        total = torch.tensor(self.dist.sum(float(total)))
        grad_norm = self.parallel.clip_grad_norm(self.policy.parameters(), cfg.max_grad_norm)
        if not (torch.isfinite(total) and torch.isfinite(grad_norm)):
            self._skip_nonfinite(float(total), float(grad_norm))
            return
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.weights_changed = True
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        scalars["loss/policy"].append(float(total))
        scalars["grad_norm"].append(float(grad_norm))
        if self.critic is not None and self.critic_optimizer is not None:
            scalars["critic/grad_norm"].append(float(self.parallel.clip_grad_norm(self.critic.parameters(), cfg.max_grad_norm)))
            self.critic_optimizer.step()
            self.critic_optimizer.zero_grad(set_to_none=True)

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient never reaches the weights: drop the gradients, count
        the skip, stop after ``max_nonfinite_steps`` in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            raise NonFiniteError(
                f"step {self.step}: {self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss ({loss}) or gradient norm "
                f"({grad_norm}); the weights were left untouched. Lower lr, check the rewards, or use dtype=float32."
            )

    def _micro_loss(self, part: Experience, n_tokens: float, n_seqs: float, seen, scalars) -> torch.Tensor:
        cfg = self.config
        b = part.batch
        out = self.held.take(b.input_ids)
        if out is None:
            out = self._policy_forward(b)
        assert out.entropy is not None  # with_entropy=True
        logp = out.logprobs.cpu() if self.device.type == "cpu" else out.logprobs
        real = b.response_mask.to(logp.device)
        mask = part.loss_mask_or_response_mask.to(logp.device)  # without truncated responses under mask_truncated_completions
        old = part.old_logprobs.to(logp.device) if part.old_logprobs is not None else logp.detach()
        pl = policy_loss(logp, old, part.advantages.to(logp.device), cfg.eps_low, cfg.eps_high, cfg.dual_clip, response_mask=real, importance_sampling_level=cfg.importance_sampling_level)
        per_token = pl.loss
        if part.sampler_logprobs is not None:
            sampler = part.sampler_logprobs.to(logp.device)
            seen["sampler_logprobs"].append(sampler.cpu())
            if cfg.tis_cap is not None:  # truncated importance sampling: pi_old / mu, capped, no gradient
                per_token = per_token * truncated_importance_weights(old, sampler, cfg.tis_cap)
        # the per-token terms are zeroed outside the loss mask; normalisers count the loss mask's tokens and sequences
        agg = lambda x: aggregate(x * mask, real, self.loss_agg, num_tokens=n_tokens, num_sequences=n_seqs, max_response_length=cfg.max_new_tokens)  # noqa: E731
        if self.kl_placement == "loss":
            assert part.ref_logprobs is not None  # loss KL needs the reference
            kl = kl_loss(logp, part.ref_logprobs.to(logp.device), self.kl_estimator)
            per_token = per_token + self.kl_controller.value * kl
            scalars["loss/kl"].append(float(agg(kl.detach())))
            seen["kl"].append(kl.detach().cpu())
        if cfg.entropy_coef:
            per_token = per_token - cfg.entropy_coef * out.entropy
            scalars["loss/entropy_bonus"].append(-cfg.entropy_coef * float(agg(out.entropy.detach())))  # the term added to the loss
        for name, value in (("logprobs", logp), ("old_logprobs", old), ("clipped_low", pl.clipped_low), ("clipped_high", pl.clipped_high), ("entropy", out.entropy), ("mask", mask)):
            seen[name].append(value.detach().cpu())
        return agg(per_token)

    def precision(self):
        """bfloat16 autocast around the models' forwards when ``autocast`` is on (precision.py)."""
        return autocast(self.device, self.autocast_dtype)

    def _policy_forward(self, b) -> TokenLogprobs:
        """The update's forward: log-probs and entropy of a micro-batch, with gradient."""
        cfg = self.config
        dev = self.device
        with self.precision():
            return response_logprobs(self.train_policy, b.input_ids.to(dev), b.attention_mask.to(dev), b.response_length, with_entropy=True, chunk_size=cfg.logprob_chunk_size, temperature=cfg.temperature, entropy_grad=cfg.entropy_coef != 0, share_prompt=cfg.share_prompt)

    def _critic_backward(self, part: Experience, n_tokens: float, n_seqs: float, scalars) -> None:
        cfg = self.config
        b = part.batch
        assert self.train_critic is not None and part.values is not None
        with self.precision():
            values = self.train_critic(b.input_ids.to(self.device), b.attention_mask.to(self.device), b.response_length).float().cpu()
        vl = value_loss(values, part.values, part.returns, cfg.value_clip)
        loss = aggregate(vl, b.response_mask, "token-mean", num_tokens=n_tokens)
        (loss * self.parallel.loss_scale).backward()
        scalars["loss/value"].append(float(loss.detach()))

    # ------------------------------------------------------------------ metrics
    def rollout_metrics(self, rollout: Rollout, exp: Experience) -> dict[str, float]:
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
            "kl/beta": float(self.kl_controller.value),
            **advantage_stats(exp.advantages, mask),
            **rollout.counts,
            **episode_metrics(rollout.generation),
        }
        for name, values in rollout.per_source.items():  # NaN where the source did not score
            m[f"reward/{name}"] = float(values.nanmean())
        if exp.kl is not None:
            m["kl/mean_token"] = float(masked_mean(exp.kl, mask))
            m["kl/mean_sequence"] = float(exp.kl.sum() / mask.shape[0])
            m["kl/return_share"] = kl_return_share(rollout.rewards, exp.kl, mask, self.kl_controller.value)
        if exp.values is not None:
            m["critic/value_mean"] = float(masked_mean(exp.values, mask))
        self.tokens_total += int(self.dist.sum(float(lengths.sum())))
        m["response/tokens_total"] = float(self.tokens_total)
        if self.config.truncate_prompts:
            m["data/truncated_prompts"] = float(self.prompts_truncated)
        return m

    def _log_samples(self, rollout: Rollout) -> None:
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for i in range(min(self.config.num_logged_samples, len(rollout.prompts))):
                row = {"step": self.step, "prompt": rollout.prompts[i], "completion": rollout.completions[i], "reward": float(rollout.rewards[i])}
                row.update({f"reward/{n}": float(v[i]) for n, v in rollout.per_source.items()})
                if rollout.generation.episodes is not None:
                    row["transcript"] = rollout.generation.episodes.transcripts[i]
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out prompts: greedy pass@1 (accuracy), mean reward of greedy responses, and
        pass@k with ``eval_samples`` samples at ``eval_temperature``. A response passes when
        its total reward is >= 1 (exact match for the built-in tasks). Sampling uses its own
        seeded RNG, so evaluating never changes the training run."""
        cfg = self.config
        rows = [self.eval_data[i] for i in range(min(len(self.eval_data), cfg.eval_max_prompts))]
        with self.timer("eval"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 7919 * self.step)
            inner = PhaseTimer()  # evaluation time is counted once, as time/eval
            greedy_gen, _, _, _, greedy = self._generate_and_score(rows, 1, self._sampling(greedy=True), inner)
            _, _, _, _, sampled = self._generate_and_score(rows, cfg.eval_samples, self._sampling(temperature=cfg.eval_temperature), inner)
        n = cfg.eval_samples
        passed = (sampled.rewards >= 1.0).view(-1, n)
        metrics = {
            "eval/reward_mean": float(greedy.rewards.mean()),
            "eval/sampled_reward_mean": float(sampled.rewards.mean()),
            "eval/accuracy": float((greedy.rewards >= 1.0).float().mean()),
            f"eval/any_correct_of_{n}": float(passed.any(dim=1).float().mean()),
            **{f"eval/{key[4:]}": v for key, v in episode_metrics(greedy_gen).items() if key in ("env/tool_call_rate", "env/turns")},
        }
        correct = passed.sum(dim=1)
        for k in sorted({1, *(2**j for j in range(1, n.bit_length()) if 2**j < n)}):  # unbiased pass@k (Chen et al. 2021) from n samples
            if k < n or n == 1:
                metrics[f"eval/pass@{k}"] = float(pass_at_k(n, correct, k).mean())
        every = torch.cat([greedy.rewards, sampled.rewards])
        self.eval_pass_fail = bool(((every == 0) | (every == 1)).all())
        if self.logger is not None:
            self.logger.log(self.step, metrics, kind="eval")
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """HF-format model (safetensors) + optimizer, scheduler, RNG, data position (safetensors +
        JSON, no pickle); atomic, keep last N. Rank 0 writes it, with every rank's RNG state."""
        rng: Any = rng_state()
        if self.dist.enabled:
            import torch.distributed as dist

            every = [None] * self.dist.world_size
            dist.all_gather_object(every, rng)
            rng = every
        policy_state = self.parallel.gather_state(self.policy)  # collectives: every rank takes part
        critic_state = self.parallel.gather_state(self.critic) if self.critic is not None else None
        with rank_directory(self.checkpoints, self.step, self.dist) as d:
            optimizer_state = self.parallel.save_optimizer(self.policy, self.optimizer, d / "optimizer")
            critic_optimizer_state = self.parallel.save_optimizer(self.critic, self.critic_optimizer, d / "critic_optimizer") if self.critic is not None and self.critic_optimizer is not None else None
            if not self.dist.is_main:
                return self.checkpoints.path(self.step)
            write_policy(self.policy, policy_state, d, self.tokenizer, merged=self.step == self.config.total_steps)
            if self.config.ref_update_every and self.ref_model is not None:  # the refreshed reference moves with the run
                self.ref_model.save_pretrained(d / "reference", safe_serialization=True)
            state = {
                "step": self.step,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "loader": self._train_loader().state_dict(),
                "rng": rng,
                "kl_coef": self.kl_controller.value,
                "nonfinite_total": self.nonfinite_total,
                "tokens_total": self.tokens_total,
                "prompts_truncated": self.prompts_truncated,
            }
            if self.critic is not None:
                state["critic"] = critic_state
                state["critic_optimizer"] = critic_optimizer_state
            save_state(d, STATE_NAME, state)
        return self.checkpoints.path(self.step)

    def _load_state(self, path: Path) -> None:
        state = load_state(path, STATE_NAME)
        self.step = state["step"]
        self.parallel.load_optimizer(self.policy, self.optimizer, path / "optimizer", state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._train_loader().load_state_dict(state["loader"])
        self.kl_controller.value = state["kl_coef"]
        self.nonfinite_total = state["nonfinite_total"]
        self.tokens_total = state["tokens_total"]
        self.prompts_truncated = int(state.get("prompts_truncated", 0))
        if self.critic is not None and self.critic_optimizer is not None:
            self.parallel.load_full_state_dict(self.critic, state["critic"])
            self.parallel.load_optimizer(self.critic, self.critic_optimizer, path / "critic_optimizer", state["critic_optimizer"])
        rng = state["rng"]
        if isinstance(rng, list):
            if len(rng) != self.dist.world_size:  # another number of ranks: fresh, distinct sampling seeds
                set_seed(self.config.seed + 100_003 * self.dist.rank + 7 * self.step)
                return
            rng = rng[self.dist.rank]
        set_rng_state(rng)
