"""Other tools' names for this package's options (TRL, Stable-Baselines3, our own earlier ones).

An unknown config key is looked up here first, so that ``num_iterations=2`` is answered with
``epochs``; docs/lm.md's TRL table is generated from the same entries
(:func:`reinforcepp.config.other_names_table`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing


@dataclasses.dataclass(frozen=True)
class OtherName:
    """What another tool's option is called here: ``keys`` (all of them options of the config
    at hand, else the entry does not apply to it), and a ``note`` when the two are not one to one."""

    tool: str
    keys: tuple[str, ...]
    note: str = ""


def _trl(*keys: str, note: str = "") -> OtherName:
    return OtherName("TRL", keys, note)


def _sb3(*keys: str, note: str = "") -> OtherName:
    return OtherName("Stable-Baselines3", keys, note)


OTHER_NAMES: dict[str, tuple[OtherName, ...]] = {
    # TRL's GRPOConfig (and the TrainingArguments it inherits, and its ModelConfig / ScriptArguments)
    "learning_rate": (_trl("lr"),),
    "beta": (_trl("kl_coef", note="TRL's beta > 0 puts a k3 KL in the loss, as estimator=grpo does; "
                                  "its default beta=0 is kl_placement=none"),),
    "num_generations": (_trl("samples_per_prompt"),),
    "max_completion_length": (_trl("max_new_tokens"),),
    "num_iterations": (_trl("epochs", note="passes over each rollout (TRL's mu)"),),
    "epsilon": (_trl("eps_low", "eps_high",
                     note="TRL's epsilon sets both clips: ratio in [1 - eps_low, 1 + eps_high]"),),
    "epsilon_high": (_trl("eps_high"),),
    "delta": (_trl("dual_clip", note="TRL's two-sided clip caps the ratio of negative-advantage tokens at delta, "
                                     "which is the dual clip with c = delta"),),
    "loss_type": (_trl("loss_agg", "estimator",
                       note="dapo and bnpo: loss_agg=token-mean (the default); grpo: loss_agg=seq-mean-token-mean; "
                            "dr_grpo: estimator=dr_grpo"),),
    "sync_ref_model": (_trl("ref_update_every", note="set ref_update_every to TRL's ref_model_sync_steps"),),
    "ref_model_sync_steps": (_trl("ref_update_every"),),
    "ref_model_mixup_alpha": (_trl("ref_update_alpha"),),
    "use_vllm": (_trl("engine", note="engine=vllm (vLLM in this process, like TRL's colocate mode)"),),
    "vllm_mode": (_trl("engine", note="engine=vllm runs vLLM in this process (TRL's colocate mode); "
                                      "there is no server mode"),),
    "vllm_enable_sleep_mode": (_trl("vllm_sleep"),),
    "vllm_importance_sampling_correction": (_trl("rollout_correction",
                                                 note="rollout_correction=truncate (or mask) turns it on"),),
    "vllm_importance_sampling_cap": (_trl("rollout_correction_high"),),
    "max_staleness": (_trl("async_rollouts",
                           note="the largest staleness, in policy versions, of an asynchronous rollout"),),
    "per_device_train_batch_size": (_trl("micro_batch_size", note="responses per forward/backward"),
                                    _trl("batch_size")),
    "gradient_accumulation_steps": (_trl("mini_batch_size", note="responses per optimizer step = micro_batch_size "
                                                                 "x the micro-batches accumulated"),),
    "generation_batch_size": (_trl("prompts_per_step", "samples_per_prompt",
                                   note="a rollout is prompts_per_step x samples_per_prompt responses"),),
    "steps_per_generation": (_trl("mini_batch_size",
                                  note="optimizer steps per rollout = rollout / mini_batch_size"),),
    "num_generations_eval": (_trl("eval_samples"),),
    "max_steps": (_trl("total_steps"), _trl("steps")),
    "num_train_epochs": (_trl("total_steps", note="a run here is counted in steps (one rollout each), "
                                                  "not in passes over the dataset"),
                         _trl("steps", note="counted in optimizer steps, not in passes over the dataset")),
    "logging_steps": (_trl("log_samples_every", note="every step's metrics are logged (metrics.jsonl, TensorBoard); "
                                                     "sample completions every log_samples_every steps"),),
    "log_completions": (_trl("log_samples_every"),),
    "num_completions_to_print": (_trl("num_logged_samples"),),
    "save_steps": (_trl("save_every"),),
    "save_strategy": (_trl("save_every", note="checkpoints are counted in steps"),),
    "save_total_limit": (_trl("keep_last"),),
    "eval_steps": (_trl("eval_every"),),
    "eval_strategy": (_trl("eval_every", note="evaluation is counted in steps; 0 = never"),),
    "resume_from_checkpoint": (_trl("resume", note="--resume output_dir=RUN continues from the run's latest "
                                                   "complete checkpoint"),),
    "report_to": (_trl("tensorboard", "wandb_project",
                       note="TensorBoard is on by default; wandb_project=NAME adds W&B"),),
    "bf16": (_trl("dtype", note="dtype=bfloat16"),),
    "fp16": (_trl("dtype", note="dtype=float16"),),
    "torch_dtype": (_trl("dtype"),),
    "lr_scheduler_type": (_trl("lr_schedule"),),
    "warmup_ratio": (_trl("warmup_steps", note="counted in optimizer steps"),),
    "model_name_or_path": (_trl("model"),),
    "dataset_name": (_trl("train_data"), _trl("data")),
    "dataset_test_split": (_trl("eval_data"),),
    "use_peft": (_trl("lora_rank", note="LoRA is on when lora_rank > 0"),),
    "lora_r": (_trl("lora_rank"),),
    "assistant_only_loss": (_trl("messages_column",
                                 note="the loss is always on the assistant turns (or the completion) only"),),
    "completion_only_loss": (_trl("completion_column", note="the loss is always on the completion only"),),
    "output": (_trl("output_dir"),),
    "ppo_epochs": (_trl("epochs"),),
    # Stable-Baselines3's PPO (and gymnasium)
    "n_envs": (_sb3("num_envs"),),
    "n_steps": (_sb3("steps_per_env"),),
    "n_epochs": (_sb3("epochs"),),
    "total_timesteps": (_sb3("total_env_steps"),),
    "ent_coef": (_sb3("entropy_coef"),),
    "vf_coef": (_sb3("value_coef"),),
    "clip_range": (_sb3("eps_low", "eps_high", note="SB3's clip_range sets both clips"),),
    "gae_lambda": (_sb3("lam"),),
    "env": (_sb3("env_id"),),
    # this project's own earlier names
    "tis_cap": (OtherName("reinforcepp", ("rollout_correction", "rollout_correction_high"),
                          note="tis_cap=C is now rollout_correction=truncate rollout_correction_high=C"),),
    "run_dir": (OtherName("reinforcepp", ("output_dir",),
                          note="the Gymnasium run folder is output_dir, as the language-model one"),),
}
"""Other tools' names for options, and ours. An entry applies to a config only when all its keys
are options of that config (``max_steps`` is ``total_steps`` for training, ``steps`` for sft)."""


def other_name(key: str, valid: typing.Collection[str]) -> OtherName | None:
    """The first entry of :data:`OTHER_NAMES` for ``key`` whose keys are all in ``valid``."""
    return next((o for o in OTHER_NAMES.get(key.lower(), ()) if all(k in valid for k in o.keys)), None)


def hint_text(o: OtherName) -> str:
    """An entry as docs/lm.md's table shows it: the keys here, then the note."""
    keys = " and ".join(f"`{k}`" for k in o.keys)
    return f"{keys}: {o.note}" if o.note else keys


def _initials(key: str) -> str:
    return "".join(word[0] for word in key.split("_") if word)


def suggest(key: str, valid: list[str]) -> str:
    """What a user most likely meant by the unknown ``key``: another tool's name for one of our
    options (``num_iterations`` -> ``epochs``), the initials of the words (``learning_rate`` ->
    ``lr``), then the closest spelling."""
    other = other_name(key, valid)
    if other is not None and len(other.keys) == 1 and not other.note:
        return f"; did you mean {other.keys[0]!r}?"
    if other is not None:
        keys = " and ".join(other.keys)
        return f" ({other.tool}'s name): here {keys}" + (f"; {other.note}" if other.note else "")
    by_initials = [v for v in valid if "_" in key and v == _initials(key.lower())]
    if by_initials:
        return f"; did you mean {by_initials[0]!r}?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""
