"""Building a run's components from explicit inputs, in the order the run needs them.

In the style of torchtitan: each model is loaded unchanged, then LoRA (:func:`~.reference.apply_lora`)
and the parallelism (:func:`parallelize`) are applied to it by functions, never by the model or the
trainer. :func:`build_components` is the whole recipe; each step is a function a test or another
recipe can call on its own:

    env_factory = load_env_factory(...)        # multi-turn environments, if any
    tokenizer, policy = load_policy(...)       # hub name, path, checkpoint, given object, or the tiny model
    data = load_data(...)                      # training and held-out prompts
    scorer = build_scorer(...)                 # reward sources, checked against the data's columns
    warm_start(...)                            # built-in tasks only
    reference = load_reference(...)            # local, URL, recorded, or the LoRA base
    policy, reference = apply_lora(...)        # lora_rank > 0
    critic = load_critic(...)                  # gae only
    models = parallelize(...)                  # one process, DDP or FSDP2; compiled; checkpointed
    engine = build_engine(...)                 # the generation engine, from the registry
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, cast

import torch

from ..config import ConfigError
from ..core import EstimatorSpec
from ..engines import GenerationEngine, WeightProvider, build_engine
from ..errors import setup_phase
from ..remote import is_url, settings_from
from ..run.rng import set_seed
from .config import LMConfig
from .lora import is_lora, load_lora
from .models import (
    check_model_source,
    enable_activation_checkpointing,
    frozen,
    load_causal_lm,
    load_critic,
    load_tokenizer,
)
from .reference import Reference, apply_lora, load_reference
from .runtime import Runtime
from .warm_start import warm_start


@dataclass
class Given:
    """What a Python caller passed to the trainer instead of naming it in the config."""

    model: Optional[torch.nn.Module] = None
    tokenizer: Any = None
    reward_funcs: Optional[Sequence[Any]] = None
    train_dataset: Any = None
    eval_dataset: Any = None
    ref_model: Any = None
    env: Optional[Callable[[], Any]] = None


@dataclass
class PromptData:
    train: Any
    """the training prompts (a ``datasets.Dataset``), or None for evaluation only"""
    eval: Any
    """the held-out prompts, or None"""
    eval_source: str
    """where the held-out prompts come from, said by ``reinforcepp eval``"""


@dataclass
class Models:
    """The run's models, as the trainer uses them."""

    tokenizer: Any
    policy: torch.nn.Module
    """the plain policy: generation, no-gradient forwards, saving"""
    train_policy: torch.nn.Module
    """what the update's forwards run through (DDP wrapper, FSDP2-sharded, compiled)"""
    reference: Optional[Reference]
    critic: Optional[torch.nn.Module]
    train_critic: Optional[torch.nn.Module]
    weights: WeightProvider
    """the policy's full weights for the engine (gathered when sharded, LoRA merged)"""
    lora: bool
    teacher: Optional[torch.nn.Module] = None
    """on-policy distillation's teacher (``teacher``), frozen"""


@dataclass
class Components:
    models: Models
    engine: GenerationEngine
    data: PromptData
    scorer: Any
    """the :class:`~reinforcepp.rewards.RewardScorer`, or None (an environment's rewards only)"""
    env_factory: Optional[Callable[[], Any]]


def build_components(config: LMConfig, rt: Runtime, spec: EstimatorSpec, given: Given) -> Components:
    """Every component of a run, built in the order that keeps the random-number stream (and so
    the results) the same on every launch."""
    env_factory = load_env_factory(config, given.env, rt.builtin_task)
    check_teacher_tokenizer(config, rt, given.tokenizer)  # before any model loads
    tokenizer, policy = load_policy(config, rt, given.model, given.tokenizer)
    # multi-turn: the prompts come from the environments' reset, checked when drawn
    check = prompt_checker(config, tokenizer, policy) if env_factory is None else None
    data = load_data(config, rt, given.train_dataset, given.eval_dataset, check)
    scorer = build_scorer(config, rt.builtin_task, given.reward_funcs, env_factory, data)
    if config.sft_steps and rt.resume_from is None and given.model is None and config.model is None:
        warm_start(policy, tokenizer, data.train, config, builtin_task=rt.builtin_task, env_factory=env_factory,
                   progress=config.progress and rt.dist.is_main)
    lora = bool(config.lora_rank) or is_lora(policy)  # a PEFT model passed in trains as LoRA too
    reference = load_reference(config, rt, policy, tokenizer, given.ref_model, given_policy=given.model is not None,
                               lora=lora)
    if lora:
        policy, reference = apply_lora(policy, config)
    if rt.dist.enabled:  # identical initial weights on every rank, then different samples
        set_seed(config.seed + 100_003 * rt.dist.rank)
    critic = None
    if spec.needs_critic:
        critic = load_critic(config.critic_model, policy, dtype=rt.parallel.master_dtype,
                             device=rt.parallel.load_device, trust_remote_code=config.trust_remote_code)
    models = parallelize(config, rt, tokenizer, policy, reference, critic, lora)
    if config.teacher is not None:  # on-policy distillation: frozen, held like the reference
        teacher = load_causal_lm(config.teacher, dtype=rt.dtype, device=rt.parallel.load_device,
                                 trust_remote_code=config.trust_remote_code)
        models.teacher = rt.parallel.frozen(frozen(teacher))
    engine = build_engine(config.engine, policy, tokenizer, rt.device, config)
    return Components(models, engine, data, scorer, env_factory)


def check_teacher_tokenizer(config: LMConfig, rt: Runtime, given_tokenizer: Any) -> None:
    """``teacher`` must share the policy's tokenizer (the same ids mean the same tokens, or its
    log-probs say nothing about the policy's samples): checked on the tokenizers alone, before
    any model loads (ConfigError naming both)."""
    if config.teacher is None:
        return
    from ..remote.protocol import tokenizer_hash
    from .tasks import ALPHABET, build_char_tokenizer, get_task

    if given_tokenizer is not None:
        policy_tok = given_tokenizer
    elif config.tokenizer or config.model:
        policy_tok = load_tokenizer(config.tokenizer or config.model or "", config.trust_remote_code)
    else:
        policy_tok = build_char_tokenizer(get_task(rt.builtin_task).alphabet if rt.builtin_task else ALPHABET)
    teacher_tok = load_tokenizer(config.teacher, config.trust_remote_code)
    if tokenizer_hash(teacher_tok) != tokenizer_hash(policy_tok):
        raise ConfigError(f"teacher={config.teacher}: its tokenizer differs from the policy's ({len(teacher_tok)} "
                          f"against {len(policy_tok)} tokens, or other ids): distillation needs the same tokenizer")


def load_policy(config: LMConfig, rt: Runtime, model: Optional[torch.nn.Module],
                tokenizer: Any) -> tuple[Any, torch.nn.Module]:
    """The tokenizer (left padding, a pad token) and the unchanged policy: from the checkpoint a
    run resumes (LoRA: its base, then the adapter), a given object, ``config.model``, or the
    built-in tiny model."""
    dtype, device, trust = rt.parallel.master_dtype, rt.parallel.load_device, config.trust_remote_code
    resume = rt.resume_from
    if config.model is not None and model is None:
        check_model_source("model", config.model)
    if config.tokenizer is not None and tokenizer is None:
        check_model_source("tokenizer", config.tokenizer, kind="tokenizer")
    if resume is not None and (resume / "adapter").exists():  # the base the adapters were trained on, then the adapter
        base = config.model or str(rt.run_dir / "reference")
        tok = tokenizer or load_tokenizer(config.tokenizer or base, trust)
        base_model = load_causal_lm(base, dtype=dtype, device=device, trust_remote_code=trust)
        return tok, load_lora(base_model, resume / "adapter")
    if resume is not None:
        tok = tokenizer or load_tokenizer(str(resume / "model"), trust)
        return tok, load_causal_lm(str(resume / "model"), dtype=dtype, device=device, trust_remote_code=trust,
                                   safetensors_only=True)
    if model is not None:
        if tokenizer is None:
            raise ValueError("Trainer(model=...) needs tokenizer=... as well")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, model.to(device)
    if config.model is not None:
        named = f"tokenizer={config.tokenizer}" if config.tokenizer and not tokenizer else f"model={config.model}"
        with setup_phase(f"loading {named}"):
            tok = tokenizer or load_tokenizer(config.tokenizer or config.model, trust)
        with setup_phase(f"loading model={config.model}"):
            return tok, load_causal_lm(config.model, dtype=dtype, device=device, trust_remote_code=trust)
    from .tasks import ALPHABET, build_char_tokenizer, build_tiny_model, get_task

    tok = tokenizer or build_char_tokenizer(get_task(rt.builtin_task).alphabet if rt.builtin_task else ALPHABET)
    return tok, build_tiny_model(tok, seed=config.seed).to(device=device, dtype=dtype)


def load_data(config: LMConfig, rt: Runtime, train_dataset: Any, eval_dataset: Any,
              check: Optional[Callable[[Any, str, bool], None]] = None) -> PromptData:
    """Training and held-out prompts: the built-in task's (written to ``RUN_DIR/data``), the given
    datasets, or ``train_data`` / ``eval_data`` (``eval_fraction`` of ``train_data`` split off
    when there is no ``eval_data``). ``check(prompts, where, lengths)`` sees every training prompt
    and the held-out prompts evaluated, before any split (:func:`prompt_checker`)."""
    from .data import load_prompt_dataset, split_eval
    from .evaluation import held_out_rows

    if rt.builtin_task is not None:
        from .tasks import get_task, write_task_files

        folder = rt.folder.staging() / "data"  # RUN_DIR/data once the run folder is open
        if rt.dist.is_main:
            write_task_files(get_task(rt.builtin_task), folder, n_train=config.task_size,
                             n_eval=config.eval_max_prompts, seed=config.seed,
                             wrong_fraction=config.sft_wrong_fraction)
        rt.dist.barrier()
        train_dataset, eval_dataset = str(folder / "train.jsonl"), str(folder / "eval.jsonl")
    trains = train_dataset if train_dataset is not None else config.train_data
    evals = eval_dataset if eval_dataset is not None else config.eval_data
    train = load_prompt_dataset(trains, prompt_column=config.prompt_column) if trains is not None else None
    if rt.builtin_task is not None:
        where = f"the built-in task {rt.builtin_task!r} (task_size={config.task_size})"
    else:
        where = str(trains) if isinstance(trains, (str, Path)) else "train_dataset"
    if evals is not None:
        held_out = load_prompt_dataset(evals, prompt_column=config.prompt_column)
        named = str(evals) if isinstance(evals, (str, Path)) else "eval_dataset"
        _check_enough(train, config, where)
        if check is not None:
            if train is not None:
                check(train[config.prompt_column], _data_name("train_data", trains), True)
            evaluated = held_out_rows(held_out, config.eval_max_prompts)
            check([row[config.prompt_column] for row in evaluated], _data_name("eval_data", evals), False)
        return PromptData(train, held_out, f"the built-in task {rt.builtin_task!r}" if rt.builtin_task else named)
    if train is None:
        raise ConfigError("no data: set train_data (and eval_data), or pass train_dataset=...")
    loaded = train
    train, held_out = split_eval(train, config.eval_fraction, config.seed)
    split_off = f" after eval_fraction={config.eval_fraction} was split off" if held_out is not None else ""
    _check_enough(train, config, where + split_off)
    if check is not None:  # the rows as in the file, before the split
        check(loaded[config.prompt_column], _data_name("train_data", trains), True)
    return PromptData(train, held_out, f"eval_fraction={config.eval_fraction} of {where}")


def prompt_checker(config: LMConfig, tokenizer: Any, policy: torch.nn.Module) -> Callable[[Any, str, bool], None]:
    """``check(prompts, where, lengths)``: every prompt tokenized once at start; an empty one, or
    (``lengths``) one longer than the context allows (without ``truncate_prompts``), is refused
    naming the data and the row (:func:`~.data.check_prompt_lengths`). Held-out prompts are checked
    for emptiness only: ``reinforcepp eval`` fits ``max_new_tokens`` to them, and a training run
    evaluates them at its start."""
    from .data import check_prompt_lengths, render_prompt
    from .models import prompt_limit

    try:
        limit: Optional[int] = prompt_limit(policy, config.max_prompt_length, config.max_new_tokens)
    except ConfigError:  # max_new_tokens leaves no room: said when a prompt is drawn (or fitted by eval)
        limit = None

    def check(prompts: Any, where: str, lengths: bool) -> None:
        def render(prompt: Any) -> str:
            return render_prompt(tokenizer, prompt, config.use_chat_template)

        check_prompt_lengths(prompts, render, tokenizer, limit=limit if lengths else None,
                             truncate=config.truncate_prompts, where=where)

    return check


def _data_name(key: str, data: Any) -> str:
    """The data in messages: ``train_data=prompts.jsonl``, or ``train_dataset`` (given in Python)."""
    return f"{key}={data}" if isinstance(data, (str, Path)) else key.replace("_data", "_dataset")


def _check_enough(train: Any, config: LMConfig, where: str) -> None:
    """One step draws ``prompts_per_step`` distinct prompts: a smaller training set is refused."""
    if train is not None and len(train) < config.prompts_per_step:
        raise ConfigError(f"{where}: {len(train)} training prompt{'s' if len(train) != 1 else ''}, "
                          f"fewer than prompts_per_step={config.prompts_per_step} (the prompts of "
                          f"one step): set prompts_per_step <= {len(train)} or give more prompts")


def build_scorer(config: LMConfig, builtin_task: Optional[str], reward_funcs: Optional[Sequence[Any]],
                 env_factory: Optional[Callable[[], Any]], data: PromptData) -> Any:
    """The reward sources (callables, spec strings, URLs, :class:`RewardSource`) with their
    weights, checked now against the data's columns (a reward needing a missing column fails
    before the first step). None: an environment's rewards only."""
    from ..rewards import RewardConfigError, RewardScorer, RewardSource, load_reward_source
    from ..rewards.remote import connect_remote_reward

    funcs = list(reward_funcs) if reward_funcs is not None else list(config.reward_funcs)
    if not funcs:
        if builtin_task is None:
            if env_factory is not None:
                return None
            raise ConfigError("no reward: set reward_funcs (module:function, path/file.py:function, "
                              "rm:MODEL, http://...) or pass reward_funcs=[...]")
        from .tasks import char_match, get_task

        funcs = [get_task(builtin_task).reward or char_match]
    weights = list(config.reward_weights) or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ConfigError(f"{len(weights)} reward_weights for {len(funcs)} reward functions")
    sources = []
    for fn, w in zip(funcs, weights):
        if is_url(fn):
            remote = connect_remote_reward(fn, settings_from(config), config.remote_batch_size)
            sources.append(RewardSource(fn, remote, w))
        elif isinstance(fn, str):
            sources.append(load_reward_source(fn, weight=w))
        elif isinstance(fn, RewardSource):
            sources.append(fn)
        else:
            sources.append(RewardSource(getattr(fn, "__name__", type(fn).__name__), fn, w))
    scorer = RewardScorer(sources, on_error=config.reward_on_error, timeout=config.reward_timeout)
    try:
        rows = data.train if data.train is not None else data.eval  # eval_data alone: `reinforcepp eval`
        scorer.check_columns([c for c in rows.column_names if c != config.prompt_column])
    except RewardConfigError as exc:
        raise ConfigError(str(exc)) from exc
    return scorer


def load_env_factory(config: LMConfig, env: Optional[Callable[[], Any]],
                     builtin_task: Optional[str]) -> Optional[Callable[[], Any]]:
    """Multi-turn environments: given, named by ``environment``, or the built-in task's."""
    if env is not None:
        return env
    if config.environment is not None:
        from ..agents import load_environment

        return load_environment(config.environment)
    if builtin_task is not None:
        from .tasks import get_task

        return get_task(builtin_task).environment
    return None


def parallelize(config: LMConfig, rt: Runtime, tokenizer: Any, policy: torch.nn.Module, reference: Optional[Reference],
                critic: Optional[torch.nn.Module], lora: bool) -> Models:
    """The models as trained: activation checkpointing, the parallelism of the launch (nothing,
    DDP or FSDP2), ``torch.compile`` of the update's forward, the reference sharded under FSDP."""
    if config.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    train_policy = rt.parallel.trained(policy)
    if config.torch_compile in ("update", "all"):  # the update's forward (and so its backward); shapes vary per step
        train_policy = cast(torch.nn.Module, torch.compile(train_policy, dynamic=True))
    train_critic = rt.parallel.trained(critic) if critic is not None else None
    reference = rt.parallel.frozen(reference)
    return Models(tokenizer, policy, train_policy, reference, critic, train_critic, rt.parallel.weights(policy), lora)
