"""``reinforcepp compare``: several estimators x seeds on one task, then one report.

    reinforcepp compare --task reverse --estimators reinforce_pp,reinforce_pp_baseline,grpo,rloo,gae --seeds 3
    reinforcepp compare --env CartPole-v1 --estimators reinforce_pp,gae --seeds 3 --out /tmp/cmp_cartpole
    reinforcepp compare --task sort --estimators reinforce_pp,grpo --steps 100 lr=1e-4    # key=value: every run
    reinforcepp compare --estimators reinforce_pp,grpo,rloo --seeds 2 --out runs/cmp-mine \
        model=PATH train_data=train.jsonl eval_data=eval.jsonl reward_funcs=my_rewards.py:correct lr=1e-5
    reinforcepp compare --report-only /tmp/cmp_cartpole                                  # rebuild the report
    reinforcepp compare --task sort --estimators "grpo,grpo[kl_estimator=k3+;kl_placement=loss]"  # variants

An entry of ``--estimators`` may carry its own ``key=value`` settings in brackets, separated by
``;`` (``grpo[importance_sampling_level=sequence;eps_low=3e-4]``): a variant of that estimator,
labelled by the whole entry, so that one report shows an option's effect.

Your own model, data and reward: no ``--task``; the ``key=value`` items that every run gets name
them, exactly as for ``reinforcepp train`` (the report is titled by the data's name). Without
``model=`` the runs use the built-in tiny model (no warm start on your data).

Every (estimator, seed) run is a fresh subprocess, started one after the other (never two at
once), seeds in the outer loop so that a drift in machine load hits every estimator alike. The
parent validates every run's config first and pins it whole (a preset edited while the
comparison runs changes nothing). The child trains with one torch thread and writes
``OUT/runs/<estimator>_s<seed>/compare_run.json``: its timings, its own peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``, so the number belongs to that run alone; the parent's
``RUSAGE_CHILDREN`` would be a maximum over all children), the peak of the training loop alone,
the resident memory after the imports, and the exact bytes of the tensors the trainer keeps.
The parent then writes ``report.md`` and ``compare.png``: mean and sample std over seeds of each
curve, a table per estimator, the ratios ``reinforce_pp / gae`` and a "Claims" section whose
verdicts come from the explicit rules in :data:`RULES`. ``docs/compare.md`` explains every number.

Every estimator keeps its own defaults (for language models: KL placement ``reward`` for
``reinforce_pp`` and ``gae``, ``loss`` for the group estimators; the report lists them).
Gymnasium runs start from the tuned per-(environment, estimator) settings of ``docs/gym.md``
(:data:`GYM_PRESETS`) when there is one; ``--no-presets`` turns them off; ``key=value`` wins over both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import InputError
from .report import build_report
from .runner import (GYM_DEFAULTS, LM_DEFAULTS, SPEC_FILE, build_config, load_runs, overrides_for_run, own_data,
                     parse_variant, pinned_overrides, resolved_summary, run_compare, run_name)

# This module's docstring above is the command's --help text; it is what a user reads.


def _machine() -> str:
    import importlib.metadata as md

    try:
        torch_v = md.version("torch")
    except md.PackageNotFoundError:
        torch_v = "?"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch_v}"


def _data_name(path: str) -> str:
    """``/tmp/dbl/train.jsonl`` -> ``dbl/train``: the report's title for a comparison on your data."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reinforcepp compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--task", default=None, help="built-in language-model task (reverse, sort, add); the tiny-model "
                   "preset. Not needed with your own data: give train_data=... (and model=, reward_funcs=, ...) as "
                   "key=value items")
    g.add_argument("--env", default=None, help="Gymnasium environment id")
    g.add_argument("--report-only", default=None, metavar="OUT",
                   help="rebuild OUT's report from its finished runs; trains nothing")
    p.add_argument("--estimators", default="reinforce_pp,gae", help="comma-separated estimator names")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    p.add_argument("--steps", type=int, default=None, help="RL steps (LM: total_steps) or environment steps "
                   "(gym: total_env_steps); default: the config's")
    p.add_argument("--out", default=None,
                   help="output directory: runs/, logs/, compare.json (default runs/compare-<task or env>)")
    p.add_argument("--report-dir", default=None, help="where report.md and compare.png go (default: OUT)")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT holds another comparison (or other files): move it aside (to OUT.old-<time>) instead of "
                   "refusing; nothing is deleted. The same comparison again resumes without it")
    p.add_argument("--no-presets", action="store_true",
                   help="Gymnasium: do not apply the tuned per-(env, estimator) settings of docs/gym.md")
    p.add_argument("overrides", nargs="*", help="key=value config items for every run (the keys of `reinforcepp "
                   "train --list-options` or `reinforcepp gym --list-options`): model=, train_data=, eval_data=, "
                   "reward_funcs=, lr=, ...")
    return p


def _fail(message: str) -> int:
    print(f"reinforcepp compare: {message}", file=sys.stderr)
    return 2


IDENTITY = {"mode": "kind", "target": "task or environment", "estimators": "estimators", "seeds": "seeds",
            "run_overrides": "settings"}
"""What makes two comparisons the same (the spec's key: what it is called in a message): the
pinned settings of every run cover the overrides, presets and steps."""


def claim_out(out: Path, spec: dict, overwrite: bool) -> bool:
    """Make ``out`` usable for ``spec``: True when it holds this same comparison (it resumes:
    finished runs are kept). A folder holding another comparison, or other files, is refused
    with one line (:class:`~reinforcepp.run.folder.RunDirError`) unless ``overwrite``, which
    moves it aside; nothing is ever deleted."""
    from ..run.folder import RunDirError, aside_path

    if not out.is_dir() or not any(out.iterdir()):
        return False
    if overwrite:
        aside = aside_path(out)
        os.replace(out, aside)
        print(f"reinforcepp compare: moved the old {out} aside to {aside}", file=sys.stderr)
        return False
    choices = f"use another --out, or --overwrite to move it aside (to {out.name}.old-<time>)"
    try:
        old = json.loads((out / SPEC_FILE).read_text())
    except (OSError, ValueError):
        raise RunDirError(f"{out} is not empty and holds no readable comparison ({SPEC_FILE}): {choices}") from None
    if not isinstance(old, dict):
        raise RunDirError(f"{out / SPEC_FILE} is not a comparison's spec: {choices}")
    differ = [name for key, name in IDENTITY.items() if old.get(key) != json.loads(json.dumps(spec[key]))]
    if differ:
        raise RunDirError(f"{out} holds another comparison (its {', '.join(differ)} differ; it was "
                          f"`{old.get('command', '?')}`): {choices}")
    return True


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from ..config import ConfigError

    if args.report_only:
        out = Path(args.report_only)
        if not (out / SPEC_FILE).exists():
            return _fail(f"{out / SPEC_FILE} does not exist: is {out} the --out of a comparison?")
        spec = json.loads((out / SPEC_FILE).read_text())
        runs, failed = load_runs(out, spec)
        print(build_report(spec, runs, failed, Path(args.report_dir or spec.get("report_dir") or out)))
        return 0
    own = own_data(args.overrides)
    if own and (args.task or args.env):
        return _fail(f"--{'task' if args.task else 'env'} and train_data/eval_data both name what to train on; "
                     "give one")
    if not args.task and not args.env and not own:
        return _fail("give --task (a built-in language-model task), --env (Gymnasium), train_data=... (your own "
                     "data), or --report-only OUT")
    mode, target = ("gym", args.env) if args.env else ("lm", args.task or _data_name(str(own)))
    estimators = [e for e in args.estimators.split(",") if e]
    if len(set(estimators)) != len(estimators) or not estimators:
        return _fail(f"--estimators must name distinct estimators, got {args.estimators!r}")
    if args.seeds < 1:
        return _fail("--seeds must be >= 1")
    out = Path(args.out or f"runs/compare-{target.replace('/', '-')}")
    report_dir = Path(args.report_dir) if args.report_dir else out
    seeds = list(range(args.seeds))
    run_overrides, resolved = {}, {}
    try:
        for est in estimators:
            for seed in seeds:
                name, extra = parse_variant(est)
                ov = overrides_for_run(mode, target, name, seed, args.steps, out / "runs" / run_name(est, seed),
                                       list(args.overrides) + extra, not args.no_presets)
                cfg = build_config(mode, ov)  # validate every run before the first one starts
                # pin the whole resolved config: an edit of a preset while the comparison runs
                # (they take an hour) must not change the later runs
                run_overrides[run_name(est, seed)] = pinned_overrides(cfg)
            resolved[est] = resolved_summary(mode, cfg)
    except (ConfigError, ValueError) as e:
        return _fail(str(e))
    steps = args.steps if args.steps is not None else (cfg.total_steps if mode == "lm" else cfg.total_env_steps)
    spec = {
        "mode": mode, "target": target, "estimators": estimators, "seeds": seeds, "steps_label": f"{steps:,}",
        "overrides": list(args.overrides), "compare_defaults": LM_DEFAULTS if mode == "lm" else GYM_DEFAULTS,
        "presets": (not args.no_presets) if mode == "gym" else None,
        "command": "reinforcepp compare " + shlex.join(argv), "machine": _machine(),
        "started": time.strftime("%Y-%m-%d %H:%M"), "out": str(out), "report_dir": str(report_dir),
        "resolved": resolved, "run_overrides": run_overrides,
    }
    try:
        resuming = claim_out(out, spec, args.overwrite)
    except InputError as e:
        return _fail(str(e))
    if resuming:
        print(f"reinforcepp compare: {out} holds this comparison: resuming it (finished runs are kept)",
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    run_compare(spec, out, log=lambda s: print(s, file=sys.stderr, flush=True))
    runs, failed = load_runs(out, spec)
    path = build_report(spec, runs, failed, report_dir)
    print(path)
    return 0 if not failed else 1
