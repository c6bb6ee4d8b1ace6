"""``reinforcepp train | sft | eval`` for language models.

One syntax for the three commands: an optional ``CONFIG.yaml``, then ``key=value`` items (the
keys of ``--list-options``). The argparse/TRL spellings of the same keys work too:
``--key value``, ``--key=value``, ``--output-dir`` for ``output_dir``
(:func:`reinforcepp.config.cli_items`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..config import Config, ConfigError, cli_items, parse_overrides, read_config_file
from ..errors import setup_phase

if TYPE_CHECKING:
    from .config import LMConfig

TRAIN_USAGE = """\
  reinforcepp train                                # built-in task, tiny model, no download
  reinforcepp train task=reverse estimator=grpo    # another built-in task and estimator
  reinforcepp train model=PATH train_data=prompts.jsonl eval_data=eval.jsonl reward_funcs=my_rewards.py:correct
  reinforcepp train my.yaml lr=1e-6 total_steps=500  # a YAML file, then overrides
  reinforcepp train --resume output_dir=runs/x     # continue a killed run"""

SFT_USAGE = """\
  reinforcepp sft model=PATH data=pairs.jsonl output_dir=OUT
  reinforcepp sft model=PATH data=pairs.jsonl output_dir=OUT steps=60 batch_size=32 lr=1e-3"""

EVAL_USAGE = """\
  reinforcepp eval runs/x                          # a run's latest checkpoint, with the run's data and settings
  reinforcepp eval model=PATH eval_data=eval.jsonl reward_funcs=my_rewards.py:correct
  reinforcepp eval model=PATH task=sort            # a built-in task's held-out prompts"""

SYNTAX = """\
Every key of --list-options can be given as key=value (as above) or, the same, as --key value,
--key=value or --key-with-dashes value."""


def _parse(argv: list[str], prog: str, description: str, usage: str, cls: type[Config],
           resume: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """``argv`` -> (flags, key=value items); a CONFIG.yaml among the words is ``args.config_file``."""
    parser = argparse.ArgumentParser(prog=prog, description=f"{description}\n\nexamples:\n{usage}\n\n{SYNTAX}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="an optional CONFIG.yaml, then key=value items")
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
        parser.add_argument("--overwrite", action="store_true", help="output_dir holds an old run: move it aside "
                            "(to OUTPUT_DIR.old-<time>) and start a new one")
    parser.add_argument("--list-options", action="store_true", help="print every key with its default and meaning")
    flags = ("-h", "--help", "--list-options") + (("--resume", "--overwrite") if resume else ())
    try:
        words = cli_items(argv, cls, flags)
    except ConfigError as e:
        parser.exit(2, f"{prog}: {e}\n")
    args = parser.parse_intermixed_args(words)  # flags anywhere: `output_dir=X --overwrite lr=1e-5`
    config_file = [a for a in args.items if "=" not in a and a.endswith((".yaml", ".yml"))]
    if len(config_file) > 1:
        parser.error(f"one config file at most, got {config_file}")
    args.config_file = config_file[0] if config_file else None
    return args, [a for a in args.items if a not in config_file]


def build_config(config_file: str | None, overrides: list[str], resume: bool = False, overwrite: bool = False):
    """Preset (the built-in tiny job when no model is named), YAML file, then overrides. On
    resume the run's saved config comes first, except its security settings (reported)."""
    from ..run.folder import merge_resumed_config, resumed_config_file
    from .config import LMConfig

    values = read_values(config_file, overrides)
    if overwrite:
        values["overwrite"] = True
    if resume:
        values["resume"] = True
        saved = resumed_config_file(values.get("output_dir"))
        if saved is not None:
            values, notes = merge_resumed_config(read_config_file(saved), typed(values), LMConfig.defaults())
            for note in notes:
                print(f"resume: {note}", file=sys.stderr)
        elif (Path(values["output_dir"]) / "config.yaml").is_file():
            # no checkpoint: refused when the run opens (before anything loads), with the command that
            # starts it again; the folder's settings only fill in that command
            values = {**read_config_file(Path(values["output_dir"]) / "config.yaml"), **typed(values)}
    return config_from_values(values)


def read_values(config_file: str | None, overrides: list[str]) -> dict[str, Any]:
    """The YAML file's mapping (if any) updated by the ``key=value`` items."""
    values = read_config_file(config_file) if config_file else {}
    values.update(parse_overrides(overrides))
    return values


def typed(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each known key's value converted to its option's type where it converts
    (``reward_funcs=a.py:f`` -> ``['a.py:f']``), so that a run folder's saved setting and the same
    setting given again compare equal; anything else is left for the config to report."""
    from ..config import coerce
    from .config import LMConfig

    types_ = LMConfig.field_types()
    out = dict(values)
    for key, value in values.items():
        if key in types_:
            try:
                out[key] = coerce(key, value, types_[key])
            except ConfigError:
                pass
    return out


def config_from_values(values: dict[str, Any]) -> LMConfig:
    """The built-in tiny job's preset under ``values`` when they name no model, else ``values`` alone."""
    from .config import LMConfig

    if values.get("model") in (None, "None", "none", ""):
        return LMConfig.tiny(**values)
    return LMConfig.from_dict(values)


def train_main(argv: list[str]) -> int:
    from .config import LMConfig

    args, overrides = _parse(argv, "reinforcepp train",
                             "Train a language model with REINFORCE++ (or another estimator).",
                             TRAIN_USAGE, LMConfig, resume=True)
    if args.list_options:
        print(LMConfig.describe())
        return 0
    # bad input: reinforcepp.cli prints one line
    config = build_config(args.config_file, overrides, args.resume, args.overwrite)
    code = _train(config)
    from .distributed import end_distributed

    end_distributed()  # under torchrun; the trainer and its DDP/FSDP wrappers are released by now
    return code


def _train(config: LMConfig) -> int:
    from ..errors import InputError, RunStopped, one_line
    from ..remote import RemoteError
    from .trainer import Trainer

    if config.model is None:
        what = f"task {config.builtin_task!r}" if config.builtin_task else "your data"
        print(f"reinforcepp train: no model given, so training the built-in tiny model on {what} "
              f"({config.sft_steps} warm-start steps, then {config.total_steps} {config.estimator} steps)",
              file=sys.stderr)
    with setup_phase("setting up the run"):
        try:
            trainer = Trainer(config)
        except RemoteError as e:  # a server that does not answer, refuses the token, or serves another vocabulary
            raise InputError(str(e)) from e
    try:
        if not trainer.dist.is_main:  # under torchrun, rank 0 reports
            trainer.train()
            return 0
        print(f"run directory: {trainer.run_dir}", file=sys.stderr)
        if trainer.rt.resume_from is not None:
            if trainer.step >= config.total_steps:
                print(f"resume: {trainer.run_dir} has done all its {config.total_steps} steps "
                      f"(checkpoint {trainer.rt.resume_from}): nothing to train; give a larger total_steps to train on",
                      file=sys.stderr)
                return 0
            print(f"resume: continuing from step {trainer.step} of {config.total_steps} "
                  f"(checkpoint {trainer.rt.resume_from})", file=sys.stderr)
        final = trainer.train()
    except RemoteError as e:
        raise RunStopped(f"step {trainer.step}: {e}{_kept(trainer, config, 'once the server is back')}") from e
    except InputError as e:  # found mid-run: a reward that failed or exited, a prompt, every group dropped
        raise InputError(f"{one_line(e)}{_kept(trainer, config, 'once it is fixed')}") from e
    if final:
        print(summary(_first_eval(trainer.run_dir), final, trainer.eval_pass_fail or trainer.builtin_task is not None))
    else:
        print(train_summary(trainer.run_dir))
    print(f"plots: {trainer.run_dir / 'plots.png'}")
    return 0


def _kept(trainer: Any, config: LMConfig, when: str) -> str:
    """``; the last checkpoint (...) is intact: ... continue with `reinforcepp train --resume ...```
    (with the keys a run folder never supplies, given again), or "" without a checkpoint."""
    from ..run.folder import CHOSEN_BY_YOU

    latest = trainer.checkpoints.latest()
    if not latest:
        return ""
    given = config.to_dict()
    again = "".join(f" {k}={','.join(v) if isinstance(v, list) else v}" for k in CHOSEN_BY_YOU if (v := given.get(k)))
    return (f"; the last checkpoint ({latest}) is intact: {when}, continue with "
            f"`reinforcepp train --resume output_dir={trainer.run_dir}{again}`")


def summary(first: dict[str, float], final: dict[str, float], pass_fail: bool) -> str:
    """The held-out numbers at the first and the last evaluation. It leads with the reward
    (greedy, then sampled); accuracy (greedy responses with total reward >= 1) and
    ``any_correct_of_n`` follow only for ``pass_fail`` rewards (built-in tasks, or rewards that
    were all 0 or 1), since for a dense reward a response at 0.9 "fails" and one at 1.0 may be a
    lucky rounding. Each number is printed under its metric's name."""

    def change(key: str) -> str:
        return f"{first.get(key, math.nan):.3f} -> {final[key]:.3f}"

    lines = [f"held-out reward (greedy) {change('eval/reward_mean')}, "
             f"reward (sampled) {change('eval/sampled_reward_mean')}"]
    if pass_fail:  # the metric's own name: any_correct_of_n (a correct answer among the n samples)
        key = next((k for k in final if k.startswith("eval/any_correct_of_")), None)
        key = key or max((k for k in final if k.startswith("eval/pass@")), key=lambda k: int(k.rsplit("@", 1)[1]))
        lines.append("held-out accuracy (greedy, reward >= 1) "
                     f"{change('eval/accuracy')}, {key.split('/', 1)[1]} {change(key)}")
    return "\n".join(lines)


def train_summary(run_dir: Path) -> str:
    """A run without evaluation: the training reward (``reward/mean``), mean of the first and
    of the last tenth of the steps, and where held-out numbers would come from."""
    from ..run import read_metrics

    rewards = [r["reward/mean"] for r in read_metrics(run_dir)
               if r.get("kind", "train") == "train" and "reward/mean" in r]
    if not rewards:
        return "no training step logged a reward"
    window = max(1, len(rewards) // 10)
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    return (f"train reward {first:.3f} -> {last:.3f} (mean of the first and last {window} of {len(rewards)} steps); "
            "no held-out evaluation (set eval_data, or eval_fraction, and eval_every > 0)")


def _first_eval(run_dir: Path) -> dict:
    from ..run import read_metrics

    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    return evals[0] if evals else {}


def sft_main(argv: list[str]) -> int:
    from .sft import SFTConfig

    args, items = _parse(argv, "reinforcepp sft",
                         "Supervised warm start on prompt/completion pairs; saves a Hugging Face model directory.",
                         SFT_USAGE, SFTConfig)
    if args.list_options:
        print(SFTConfig.describe())
        return 0
    return run_sft(SFTConfig.load(args.config_file, items))  # bad input: reinforcepp.cli prints one line


def run_sft(cfg: Any) -> int:
    """Load, fine-tune and save, as ``reinforcepp sft`` does with the :class:`SFTConfig` ``cfg``."""
    from ..run import Progress
    from .data import load_prompt_dataset
    from .models import (
        load_causal_lm,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        set_torch_threads,
    )
    from .sft import data_format, default_sft_lr, encode_examples, sft_on_ids

    set_torch_threads(cfg.torch_threads)
    device = resolve_device(cfg.device)
    model_path, tokenizer_path = claim_sft_output(cfg)
    with setup_phase(f"loading model {cfg.model!r} and data {cfg.data!r}"):
        data = load_prompt_dataset(cfg.data, prompt_column=None)
        kind = data_format(list(data.column_names), cfg)
        tokenizer = load_tokenizer(tokenizer_path, cfg.trust_remote_code)
        model: Any = load_causal_lm(model_path, dtype=resolve_dtype(cfg.dtype, device), device=device,
                                    trust_remote_code=cfg.trust_remote_code)
    prompt_ids, response_ids, masks = encode_examples(tokenizer, data, kind, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    lr = cfg.lr if cfg.lr is not None else default_sft_lr(n_params)
    what = "pairs" if kind == "pairs" else "conversations (assistant turns learned)"
    how = "" if cfg.lr is not None else " (by model size; set lr= to change)"
    print(f"reinforcepp sft: {n_params / 1e6:.2f}M parameters, lr {lr:g}{how}, "
          f"{cfg.steps} steps of {cfg.batch_size} {what}", file=sys.stderr)
    bar = Progress(cfg.steps, desc="sft", keys={"loss": "loss"})
    losses = sft_on_ids(model, tokenizer.pad_token_id, prompt_ids, response_ids, response_masks=masks, steps=cfg.steps,
                        batch_size=cfg.batch_size, lr=lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
                        on_step=lambda s, v: bar.update({"loss": v}))
    bar.close()
    model.save_pretrained(cfg.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(cfg.output_dir)
    window = max(1, len(losses) // 10)
    print(f"loss {sum(losses[:window]) / window:.3f} -> "
          f"{sum(losses[-window:]) / window:.3f} (mean of the first and last {window} steps)")
    print(f"saved {cfg.output_dir}")
    return 0


def claim_sft_output(cfg: Any) -> tuple[str, str]:
    """The model and tokenizer paths to load. A non-empty ``output_dir`` (or the input model
    itself) is refused unless ``overwrite``, which moves it aside first (and then loads the model
    from where it moved)."""
    from ..errors import InputError
    from ..run.folder import claim_run_dir

    out, model, tokenizer = Path(cfg.output_dir), cfg.model, cfg.tokenizer or cfg.model
    if not out.is_dir() or not any(out.iterdir()):
        if out.is_file():
            raise InputError(f"output_dir={out} is a file; give a folder for the fine-tuned model")
        return model, tokenizer
    same = {p for p in (model, tokenizer) if Path(p).exists() and Path(p).resolve() == out.resolve()}
    if not cfg.overwrite:
        what = "is the model being fine-tuned: saving there would replace it" if same else "already holds files"
        raise InputError(f"output_dir={out} {what}; choose another output_dir, or "
                         f"--overwrite to move it aside (to {out.name}.old-<time>) first")
    aside = claim_run_dir(out, resume=False, overwrite=True)
    assert aside is not None
    print(f"reinforcepp sft: moved the old {out} aside to {aside}", file=sys.stderr)
    return (str(aside) if model in same else model), (str(aside) if tokenizer in same else tokenizer)


def eval_main(argv: list[str]) -> int:
    from .config import LMConfig

    args, overrides = _parse(argv, "reinforcepp eval",
                             "Evaluate a model on held-out prompts: greedy and sampled reward, accuracy, pass@k.",
                             EVAL_USAGE, LMConfig)
    if args.list_options:
        print(LMConfig.describe())
        return 0
    config, found = eval_config(args.config_file, overrides)
    return run_eval(config, found, given=set(read_values(args.config_file, [o for o in overrides if "=" in o])))


def eval_config(config_file: Optional[str], overrides: list[str]) -> tuple[LMConfig, Any]:
    """The evaluation's config, and the run checkpoint it evaluates (:mod:`.runs`) or None. A bare
    folder among the words is ``model=FOLDER``; a run's own ``config.yaml`` is not taken as the
    settings of another model (its ``model`` is where that run started)."""
    from ..errors import InputError
    from .runs import check_model_path, eval_settings, find_checkpoint, is_run_dir

    bare = [o for o in overrides if "=" not in o]
    for word in bare:
        if not Path(word).is_dir():
            raise InputError(f"{word!r} is neither key=value, a CONFIG.yaml nor "
                             "a folder (a model or a run folder to evaluate)")
    if len(bare) > 1:
        raise InputError(f"one model or run folder at a time, got {bare}")
    items = [o for o in overrides if "=" in o] + [f"model={w}" for w in bare]
    values = read_values(config_file, items)
    if (config_file and is_run_dir(Path(config_file).resolve().parent)
            and not any(o.startswith("model=") for o in items)):
        run = Path(config_file).parent
        started = values.get("model") or "None (the built-in tiny model)"
        raise InputError(f"{config_file} is the saved config of the run {run}, and its model={started} is the "
                         f"model that run started from, not the one it trained: `reinforcepp eval {run}` evaluates "
                         "the run's latest checkpoint; add model=... to evaluate another model with these settings")
    found = find_checkpoint(str(values["model"])) if values.get("model") not in (None, "None", "none", "") else None
    if found is not None:
        saved = read_config_file(found.run_dir / "config.yaml")
        values, notes = eval_settings(found, saved, typed(values))
        for note in notes:
            print(f"eval: {note}", file=sys.stderr)
    elif values.get("model") not in (None, "None", "none", ""):
        check_model_path(str(values["model"]))
    values.update(total_steps=1, sft_steps=0, tensorboard=False, kl_placement="none", progress=False, resume=False)
    return config_from_values(values), found


def run_eval(config: LMConfig, found: Any = None, given: Optional[set[str]] = None) -> int:
    """Evaluate as ``reinforcepp eval`` does: ``found`` (a :class:`~.runs.RunCheckpoint`) at its
    step's seed; a ``max_new_tokens`` the model cannot hold refused (``given``) or lowered."""
    from ..errors import InputError
    from .evaluation import fitting_max_new_tokens, held_out_rows
    from .trainer import Trainer

    given = (given or set()) | ({"max_new_tokens"} if found is not None else set())
    with setup_phase("setting up the evaluation"):
        trainer = Trainer(config)
    if trainer.eval_data is None:
        print("reinforcepp eval: no held-out prompts: set eval_data (or train_data with eval_fraction > 0)",
              file=sys.stderr)
        return 2
    fit = None if trainer.env_factory is not None else fitting_max_new_tokens(
        trainer.sampler, held_out_rows(trainer.eval_data, config.eval_max_prompts), config.prompt_column)
    if fit is not None and config.max_new_tokens > fit[0]:
        room, context, longest = fit
        if room < 1:
            raise InputError(f"held-out prompts of up to {longest} tokens leave "
                             f"no room in the model's context of {context} tokens")
        if "max_new_tokens" in given:
            raise InputError(f"max_new_tokens={config.max_new_tokens} does not fit the "
                             f"model's context of {context} tokens after held-out prompts "
                             f"of up to {longest} tokens: set max_new_tokens={room} or less")
        print(f"eval: max_new_tokens={config.max_new_tokens} (the default) does not fit the model's context of "
              f"{context} tokens after held-out prompts of up to {longest} tokens: using max_new_tokens={room} "
              "(set it to choose)", file=sys.stderr)
        config.max_new_tokens = room  # the sampler reads it from this config at each call
    if found is not None:
        trainer.step = found.step  # the run's own evaluation at this step sampled with seed + 7919 * step
        print(f"evaluating {found.run_dir}, checkpoint of step {found.step} ({found.model}), on {trainer.eval_source}, "
              f"with the run's settings (max_new_tokens={config.max_new_tokens}, eval_samples={config.eval_samples}, "
              f"seed={config.seed}): the samples of the run's own evaluation at step {found.step}", file=sys.stderr)
    else:
        print(f"evaluating {config.model or 'the built-in tiny model'} on {trainer.eval_source}", file=sys.stderr)
    for k, v in trainer.evaluate().items():
        print(f"{k}: {v:.4f}")
    if trainer.logger is not None:
        trainer.logger.close()
    return 0
