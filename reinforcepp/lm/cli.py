"""``reinforcepp train | sft | eval`` for language models.

    reinforcepp train                                # built-in task, tiny model, no download
    reinforcepp train config.yaml key=value ...      # your model, data and rewards
    reinforcepp train --resume output_dir=runs/x     # continue a killed run
    reinforcepp sft data=pairs.jsonl model=PATH output_dir=out
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, cast

from ..config import parse_overrides
from ..errors import setup_phase


def _split_args(argv: list[str], prog: str, description: str) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="an optional CONFIG.yaml, then key=value overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="output_dir holds an old run: move it aside (to OUTPUT_DIR.old-<time>) and start a new one")
    parser.add_argument("--list-options", action="store_true", help="print every config key with its default and meaning")
    args = parser.parse_args(argv)
    config_file = [a for a in args.items if "=" not in a and a.endswith((".yaml", ".yml"))]
    overrides = [a for a in args.items if a not in config_file]
    if len(config_file) > 1:
        parser.error(f"one config file at most, got {config_file}")
    args.config_file = config_file[0] if config_file else None
    return args, overrides


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
    args, overrides = _split_args(argv, "reinforcepp train", __doc__ or "")
    from .config import LMConfig

    if args.list_options:
        print(LMConfig.describe())
        return 0
    config = build_config(args.config_file, overrides, args.resume, args.overwrite)  # bad input: reinforcepp.cli prints one line
    from .trainer import Trainer

    if config.model is None:
        print(f"reinforcepp train: no model given, so training the built-in tiny model on task {config.task!r} "
              f"({config.sft_steps} warm-start steps, then {config.total_steps} {config.estimator} steps)", file=sys.stderr)
    with setup_phase("setting up the run"):
        trainer = Trainer(config)
    if not trainer.dist.is_main:  # under torchrun, rank 0 reports
        trainer.train()
        return 0
    print(f"run directory: {trainer.run_dir}", file=sys.stderr)
    final = trainer.train()
    first = _first_eval(trainer.run_dir)
    if final:
        summary = ", ".join(f"{k.split('/', 1)[1]} {first.get(k, float('nan')):.3f} -> {v:.3f}" for k, v in final.items())
        print(f"held-out {summary}")
    print(f"plots: {trainer.run_dir / 'plots.png'}")
    return 0


def _first_eval(run_dir: Path) -> dict:
    from ..run import read_metrics

    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    return evals[0] if evals else {}


def sft_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="reinforcepp sft", description="Supervised warm start on prompt/completion pairs; saves a Hugging Face model directory.")
    parser.add_argument("--data", required=True, help=".jsonl/.parquet/dataset with prompt and completion columns")
    parser.add_argument("--model", required=True, help="model name or path")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--completion-column", default="completion")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat-template", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from ..run import Progress
    from .data import load_prompt_dataset, render_prompt
    from .models import load_causal_lm, load_tokenizer, resolve_device
    from .sft import sft_train

    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        print(f"reinforcepp sft: need --steps >= 1, --batch-size >= 1 and --lr > 0, got {args.steps}, {args.batch_size}, {args.lr}", file=sys.stderr)
        return 2
    device = resolve_device("auto")
    with setup_phase(f"loading model {args.model!r} and data {args.data!r}"):
        tokenizer = load_tokenizer(args.model)
        model = load_causal_lm(args.model, dtype=torch.float32, device=device)
        data = load_prompt_dataset(args.data)
    if args.completion_column not in data.column_names:
        print(f"reinforcepp sft: {args.data} has no column {args.completion_column!r} (columns: {', '.join(data.column_names)})", file=sys.stderr)
        return 2
    prompts = [render_prompt(tokenizer, p, not args.no_chat_template) for p in data["prompt"]]
    bar = Progress(args.steps, desc="sft", keys={"loss": "loss"})
    sft_train(model, tokenizer, prompts, list(data[args.completion_column]), steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, on_step=lambda _, loss: bar.update({"loss": loss}))
    bar.close()
    cast(Any, model).save_pretrained(args.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved {args.output_dir}")
    return 0


def eval_main(argv: list[str]) -> int:
    args, overrides = _split_args(argv, "reinforcepp eval", "Evaluate a model on the eval split: greedy accuracy, reward, pass@k.")
    config = build_config(args.config_file, overrides + ["total_steps=1", "sft_steps=0", "tensorboard=false", "kl_placement=none"], False)
    from .trainer import Trainer

    with setup_phase("setting up the evaluation"):
        trainer = Trainer(config)
    for k, v in trainer.evaluate().items():
        print(f"{k}: {v:.4f}")
    if trainer.logger is not None:
        trainer.logger.close()
    return 0
