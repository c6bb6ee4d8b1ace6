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
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..config import Config, ConfigError, cli_items, parse_overrides
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
  reinforcepp eval model=runs/x/checkpoints/step_00000100/model eval_data=eval.jsonl reward_funcs=my_rewards.py:correct
  reinforcepp eval model=PATH task=sort            # a built-in task's held-out prompts"""

SYNTAX = """\
Every key of --list-options can be given as key=value (as above) or, the same, as --key value,
--key=value or --key-with-dashes value."""


def _parse(argv: list[str], prog: str, description: str, usage: str, cls: type[Config], resume: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """``argv`` -> (flags, key=value items); a CONFIG.yaml among the words is ``args.config_file``."""
    parser = argparse.ArgumentParser(prog=prog, description=f"{description}\n\nexamples:\n{usage}\n\n{SYNTAX}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="an optional CONFIG.yaml, then key=value items")
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
        parser.add_argument("--overwrite", action="store_true", help="output_dir holds an old run: move it aside (to OUTPUT_DIR.old-<time>) and start a new one")
    parser.add_argument("--list-options", action="store_true", help="print every key with its default and meaning")
    flags = ("-h", "--help", "--list-options") + (("--resume", "--overwrite") if resume else ())
    try:
        words = cli_items(argv, cls, flags)
    except ConfigError as e:
        parser.exit(2, f"{prog}: {e}\n")
    args = parser.parse_args(words)
    config_file = [a for a in args.items if "=" not in a and a.endswith((".yaml", ".yml"))]
    if len(config_file) > 1:
        parser.error(f"one config file at most, got {config_file}")
    args.config_file = config_file[0] if config_file else None
    return args, [a for a in args.items if a not in config_file]


def build_config(config_file: str | None, overrides: list[str], resume: bool = False, overwrite: bool = False):
    """Preset (the built-in tiny job when no model is named), YAML file, then overrides. On
    resume the run's saved config comes first, except its security settings (reported)."""
    import yaml

    from ..run.folder import merge_resumed_config
    from .config import LMConfig

    values = dict(yaml.safe_load(Path(config_file).read_text()) or {}) if config_file else {}
    values.update(parse_overrides(overrides))
    if overwrite:
        values["overwrite"] = True
    if resume:
        values["resume"] = True
        saved = Path(values["output_dir"]) / "config.yaml" if values.get("output_dir") else None
        if saved is not None and saved.exists():
            values, notes = merge_resumed_config(yaml.safe_load(saved.read_text()) or {}, values)
            for note in notes:
                print(f"resume: {note}", file=sys.stderr)
    if values.get("model") in (None, "None", "none", ""):
        return LMConfig.tiny(**values)
    return LMConfig.from_dict(values)


def train_main(argv: list[str]) -> int:
    from .config import LMConfig

    args, overrides = _parse(argv, "reinforcepp train", "Train a language model with REINFORCE++ (or another estimator).", TRAIN_USAGE, LMConfig, resume=True)
    if args.list_options:
        print(LMConfig.describe())
        return 0
    config = build_config(args.config_file, overrides, args.resume, args.overwrite)  # bad input: reinforcepp.cli prints one line
    code = _train(config)
    from .distributed import end_distributed

    end_distributed()  # under torchrun; the trainer and its DDP/FSDP wrappers are released by now
    return code


def _train(config: LMConfig) -> int:
    from ..errors import InputError, RunStopped
    from ..remote import RemoteError
    from .trainer import Trainer

    if config.model is None:
        what = f"task {config.builtin_task!r}" if config.builtin_task else "your data"
        print(f"reinforcepp train: no model given, so training the built-in tiny model on {what} "
              f"({config.sft_steps} warm-start steps, then {config.total_steps} {config.estimator} steps)", file=sys.stderr)
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
        final = trainer.train()
    except RemoteError as e:
        latest = trainer.checkpoints.latest()
        urls = (("ref_model", config.ref_model), ("reward_funcs", ",".join(config.reward_funcs)),
                ("rollout_urls", ",".join(config.rollout_urls)))
        again = "".join(f" {k}={v}" for k, v in urls if v)  # never read back from a run folder
        kept = f"; the last checkpoint ({latest}) is intact: once the server is back, continue with `reinforcepp train --resume output_dir={trainer.run_dir}{again}`" if latest else ""
        raise RunStopped(f"step {trainer.step}: {e}{kept}") from e
    if final:
        print(summary(_first_eval(trainer.run_dir), final, trainer.eval_pass_fail or trainer.builtin_task is not None))
    print(f"plots: {trainer.run_dir / 'plots.png'}")
    return 0


def summary(first: dict[str, float], final: dict[str, float], pass_fail: bool) -> str:
    """The held-out numbers at the first and the last evaluation. It leads with the reward
    (greedy, then sampled); accuracy (greedy responses with total reward >= 1) and pass@k follow
    only for ``pass_fail`` rewards (built-in tasks, or rewards that were all 0 or 1), since for a
    dense reward a response at 0.9 "fails" and one at 1.0 may be a lucky rounding."""

    def change(key: str) -> str:
        return f"{first.get(key, math.nan):.3f} -> {final[key]:.3f}"

    lines = [f"held-out reward (greedy) {change('eval/reward_mean')}, reward (sampled) {change('eval/sampled_reward_mean')}"]
    if pass_fail:
        any_of = next((k for k in final if k.startswith("eval/any_correct_of_")), None)  # = unbiased pass@n for k = n
        pass_k = any_of or max((k for k in final if k.startswith("eval/pass@")), key=lambda k: int(k.rsplit("@", 1)[1]))
        label = f"pass@{any_of.rsplit('_', 1)[1]}" if any_of else pass_k.split("/", 1)[1]
        lines.append(f"held-out accuracy (greedy, reward >= 1) {change('eval/accuracy')}, {label} {change(pass_k)}")
    return "\n".join(lines)


def _first_eval(run_dir: Path) -> dict:
    from ..run import read_metrics

    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    return evals[0] if evals else {}


def sft_main(argv: list[str]) -> int:
    from .sft import SFTConfig

    args, items = _parse(argv, "reinforcepp sft", "Supervised warm start on prompt/completion pairs; saves a Hugging Face model directory.", SFT_USAGE, SFTConfig)
    if args.list_options:
        print(SFTConfig.describe())
        return 0
    return run_sft(SFTConfig.load(args.config_file, items))  # bad input: reinforcepp.cli prints one line


def run_sft(cfg: Any) -> int:
    """Load, fine-tune and save, as ``reinforcepp sft`` does with the :class:`SFTConfig` ``cfg``."""
    from ..run import Progress
    from .data import load_prompt_dataset, render_prompt
    from .models import (
        load_causal_lm,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        set_torch_threads,
    )
    from .sft import default_sft_lr, sft_train

    set_torch_threads(cfg.torch_threads)
    device = resolve_device(cfg.device)
    with setup_phase(f"loading model {cfg.model!r} and data {cfg.data!r}"):
        data = load_prompt_dataset(cfg.data, prompt_column=cfg.prompt_column)
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
        model: Any = load_causal_lm(cfg.model, dtype=resolve_dtype(cfg.dtype, device), device=device, trust_remote_code=cfg.trust_remote_code)
    if cfg.completion_column not in data.column_names:
        print(f"reinforcepp sft: {cfg.data} has no column {cfg.completion_column!r} (columns: {', '.join(data.column_names)})", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    lr = cfg.lr if cfg.lr is not None else default_sft_lr(n_params)
    print(f"reinforcepp sft: {n_params / 1e6:.2f}M parameters, lr {lr:g}{'' if cfg.lr is not None else ' (by model size; set lr= to change)'}, "
          f"{cfg.steps} steps of {cfg.batch_size} pairs", file=sys.stderr)
    prompts = [render_prompt(tokenizer, p, cfg.use_chat_template) for p in data[cfg.prompt_column]]
    bar = Progress(cfg.steps, desc="sft", keys={"loss": "loss"})
    losses = sft_train(model, tokenizer, prompts, list(data[cfg.completion_column]), steps=cfg.steps, batch_size=cfg.batch_size, lr=lr,
                       weight_decay=cfg.weight_decay, seed=cfg.seed, on_step=lambda s, v: bar.update({"loss": v}))
    bar.close()
    model.save_pretrained(cfg.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(cfg.output_dir)
    window = max(1, len(losses) // 10)
    print(f"loss {sum(losses[:window]) / window:.3f} -> {sum(losses[-window:]) / window:.3f} (mean of the first and last {window} steps)")
    print(f"saved {cfg.output_dir}")
    return 0


def eval_main(argv: list[str]) -> int:
    from .config import LMConfig

    args, overrides = _parse(argv, "reinforcepp eval", "Evaluate a model on held-out prompts: greedy and sampled reward, accuracy, pass@k.", EVAL_USAGE, LMConfig)
    if args.list_options:
        print(LMConfig.describe())
        return 0
    fixed = ["total_steps=1", "sft_steps=0", "tensorboard=false", "kl_placement=none", "progress=false"]
    scratch: Optional[tempfile.TemporaryDirectory] = None
    if not any(o.split("=", 1)[0] == "output_dir" for o in overrides):
        scratch = tempfile.TemporaryDirectory(prefix="reinforcepp-eval-")  # nothing left behind
        fixed.append(f"output_dir={scratch.name}")
    from .trainer import Trainer

    try:
        config = build_config(args.config_file, overrides + fixed, False)
        with setup_phase("setting up the evaluation"):
            trainer = Trainer(config)
        if trainer.eval_data is None:
            print("reinforcepp eval: no held-out prompts: set eval_data (or train_data with eval_fraction > 0)", file=sys.stderr)
            return 2
        print(f"evaluating {config.model or 'the built-in tiny model'} on {trainer.eval_source}", file=sys.stderr)
        for k, v in trainer.evaluate().items():
            print(f"{k}: {v:.4f}")
        if trainer.logger is not None:
            trainer.logger.close()
    finally:
        if scratch is not None:
            scratch.cleanup()
    return 0
