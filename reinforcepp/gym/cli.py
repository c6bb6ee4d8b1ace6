"""``reinforcepp gym``: train a Gymnasium policy with the REINFORCE++ core.

    reinforcepp gym --env CartPole-v1 --output-dir runs/cartpole seed=1 lr=1e-3
    reinforcepp gym --config my.yaml estimator=gae
    reinforcepp gym --list-options
    reinforcepp gym --eval runs/cartpole --episodes 20 [--video]

``--env``, ``--estimator``, ``--steps``, ``--seed`` and ``--output-dir`` are shorthands for the
config keys ``env_id``, ``estimator``, ``total_env_steps``, ``seed`` and ``output_dir``; any
config key can be set as ``key=value``.

Where :data:`reinforcepp.gym.presets.PRESETS` has tuned settings for the (environment,
estimator) pair, they are applied under the config file and the ``key=value`` overrides (which
win), and the first line of output says so; ``--no-preset`` starts from the plain defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..errors import setup_phase
from .config import GymConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reinforcepp gym",
        description="Train a Gymnasium policy with REINFORCE++ (or gae / reinforce) from the shared core.",
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value (see --list-options)")
    p.add_argument("--config", default=None, help="YAML config file (keys of --list-options)")
    p.add_argument("--env", dest="env_id", default=None, help="environment id (config key env_id)")
    p.add_argument("--estimator", default=None, help="advantage estimator (reinforce_pp, reinforce, gae)")
    p.add_argument("--steps", dest="total_env_steps", default=None,
                   help="total environment steps (config key total_env_steps)")
    p.add_argument("--seed", default=None, help="seed")
    p.add_argument("--output-dir", dest="output_dir", default=None, help="run directory (config key output_dir)")
    p.add_argument("--no-preset", action="store_true",
                   help="do not apply the tuned preset of the (environment, estimator) pair")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run directory, with the run's saved config "
                        "(overrides given here apply on top)")
    p.add_argument("--overwrite", action="store_true",
                   help="the run directory holds an old run: move it aside (to RUN_DIR.old-<time>) and start a new one")
    p.add_argument("--list-options", action="store_true", help="print every config key with its default and meaning")
    p.add_argument("--eval", dest="eval_dir", default=None,
                   help="evaluate the latest checkpoint of this run directory instead of training")
    p.add_argument("--episodes", type=int, default=None,
                   help="with --eval: episodes (default: the run's eval_episodes)")
    p.add_argument("--video", action="store_true",
                   help="with --eval: record the first episode to RUN_DIR/videos (render extra)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.list_options:
        print(GymConfig.describe())
        return 0
    from .trainer import GymTrainer

    if args.eval_dir:
        return _evaluate(args)
    # bad input raises InputError: reinforcepp.cli prints one line and exits with code 2
    shorthands = [f"{k}={v}" for k in ("env_id", "estimator", "total_env_steps", "seed", "output_dir")
                  if (v := getattr(args, k)) is not None]
    if args.resume:
        shorthands.append("resume=true")
    if args.overwrite:
        shorthands.append("overwrite=true")
    overrides = shorthands + list(args.overrides)
    if args.resume:
        cfg = _resumed_config(args.config, overrides)
    else:
        cfg = load_with_preset(args.config, overrides, use_preset=not args.no_preset)
    with setup_phase(f"setting up {cfg.env_id}"):
        trainer = GymTrainer(cfg)
    try:
        final = trainer.train()
    finally:
        trainer.close()
    print(json.dumps({"output_dir": str(trainer.run_dir), **final}))
    return 0


def load_with_preset(
    path: Optional[str], overrides: list[str], *, use_preset: bool = True, announce: bool = True
) -> GymConfig:
    """The config of a training run: the tuned preset of its (environment, estimator) pair
    where one exists, then the YAML file, then ``key=value`` overrides. Prints one line naming the
    preset and its values (or saying that there is none)."""
    from .presets import PRESETS

    plain = GymConfig.load(path, overrides)
    preset = PRESETS.get((plain.env_id, plain.estimator)) if use_preset else None
    if preset is None:
        if announce:
            why = "--no-preset" if not use_preset else "no tuned preset for this pair"
            print(f"reinforcepp gym: {plain.env_id} / {plain.estimator}: plain defaults ({why})", flush=True)
        return plain
    explicit = _explicit_keys(path, overrides)
    values = {**preset, **{k: getattr(plain, k) for k in explicit}}
    cfg = plain.replace(**values)
    if announce:
        shown = " ".join(f"{k}={v}" for k, v in preset.items() if k not in explicit)
        kept = (f"; yours kept: {', '.join(sorted(k for k in preset if k in explicit))}"
                if any(k in explicit for k in preset) else "")
        print(f"reinforcepp gym: {plain.env_id} / {plain.estimator}: tuned preset applied ({shown}){kept}; "
              "--no-preset for plain defaults", flush=True)
    return cfg


def _explicit_keys(path: Optional[str], overrides: list[str]) -> set[str]:
    """The config keys the user set, in the YAML file or as ``key=value``."""
    from ..config import parse_overrides, read_config_file

    keys = set(parse_overrides(overrides))
    if path is not None:
        keys |= set(read_config_file(path))
    return keys


def saved_config(path: "Path") -> dict:
    """A run folder's config.yaml, with the key of older versions renamed (``run_dir`` is now
    ``output_dir``, shared with the language-model trainer)."""
    from ..config import read_config_file

    values = read_config_file(path)
    if "run_dir" in values:
        values.setdefault("output_dir", values.pop("run_dir"))
    return values


def _resumed_config(config_file: Optional[str], overrides: list[str]) -> GymConfig:
    """The run's saved config.yaml, then the user's config file and overrides on top (each
    change reported); security settings never come from the folder. A run folder without a
    complete checkpoint is refused."""
    from pathlib import Path

    from ..config import parse_overrides, read_config_file
    from ..run import CheckpointManager
    from ..run.folder import RunDirError, merge_resumed_config, resumed_config_file

    given = read_config_file(config_file) if config_file else {}
    given.update(parse_overrides(overrides))
    if given.get("output_dir") in (None, "", "None", "none"):
        raise RunDirError("--resume continues a run: name its folder with --output-dir RUN (or output_dir=RUN)")
    run_dir = Path(str(given["output_dir"]))
    if CheckpointManager(run_dir).latest() is None:
        raise RunDirError(f"--resume: {run_dir} holds no complete checkpoint to resume; "
                          "drop --resume to start a new run")
    saved = resumed_config_file(run_dir)
    assert saved is not None
    values, notes = merge_resumed_config(saved_config(saved), given, GymConfig.defaults())
    for note in notes:
        print(f"resume: {note}", file=sys.stderr)
    return GymConfig.from_dict(values)


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..run import CheckpointManager
    from .trainer import GymTrainer

    run_dir = Path(args.eval_dir)
    latest = CheckpointManager(run_dir).latest_intact()
    if latest is None:
        print(f"reinforcepp gym: no complete checkpoint in {run_dir}/checkpoints", file=sys.stderr)
        return 2
    from ..config import parse_overrides
    from ..run.folder import merge_resumed_config, resumed_config_file

    env = [f"env_id={args.env_id}"] if args.env_id is not None else []  # --env, as on resume
    given = parse_overrides(env + list(args.overrides))
    saved = resumed_config_file(run_dir)
    assert saved is not None
    values, notes = merge_resumed_config(saved_config(saved), given, GymConfig.defaults(), what="eval")
    for note in notes:
        print(f"eval: {note}", file=sys.stderr)
    cfg = GymConfig.from_dict(values)
    with setup_phase(f"setting up {cfg.env_id}"):
        trainer = GymTrainer(cfg)
    try:
        trainer.load(latest)
        video_dir = run_dir / "videos" if args.video else None
        result = trainer.evaluate(args.episodes or cfg.eval_episodes, video_dir=video_dir)
    finally:
        trainer.close()
    print(json.dumps({"checkpoint": str(latest), **result}))
    return 0
