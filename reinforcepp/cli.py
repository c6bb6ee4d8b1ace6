"""``reinforcepp`` command line: one entry point, a subcommand per job.

Each subcommand lives in its own module and is imported only when asked for, so
``reinforcepp plot`` does not pay for transformers and ``reinforcepp gym`` not for datasets.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

# subcommand -> (module, function, one-line help); the function takes argv and returns an exit code
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("reinforcepp.lm.cli", "train_main", "train a language model with REINFORCE++ (default: a built-in task)"),
    "sft": ("reinforcepp.lm.cli", "sft_main", "supervised fine-tuning warm start on prompt/completion data"),
    "eval": ("reinforcepp.lm.cli", "eval_main", "evaluate a model or checkpoint on a task or dataset"),
    "compare": ("reinforcepp.compare", "main", "run several estimators x seeds on one task and write a report"),
    "gym": ("reinforcepp.gym.cli", "main", "train a Gymnasium policy with the same core"),
    "plot": ("reinforcepp.cli", "plot_main", "write the PNG plots of a run directory"),
    "serve": ("reinforcepp.serve.cli", "main",
              "serve a reference, reward or rollout model over HTTP for training elsewhere"),
    "selfcheck": ("reinforcepp.selfcheck", "main", "run every estimator on a small built-in batch and print a table"),
}


def plot_main(argv: list[str]) -> int:
    import argparse

    from .run import plot_run

    parser = argparse.ArgumentParser(prog="reinforcepp plot",
                                     description="Write RUN_DIR/plots.png from RUN_DIR/metrics.jsonl.")
    parser.add_argument("run_dir")
    parser.add_argument("--keys", default=None, help="comma-separated metric names (default: the standard ones)")
    parser.add_argument("--out", default=None, help="output PNG path (default RUN_DIR/plots.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.keys.split(",") if args.keys else None, args.out))
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: reinforcepp COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`reinforcepp COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Run one subcommand. Bad input (:class:`~reinforcepp.errors.InputError`) prints one line
    and exits with code 2; ``--debug`` (anywhere in the arguments) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"reinforcepp: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from .errors import InputError, RunStopped, one_line

    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except (InputError, RunStopped) as e:
        if debug:
            raise
        print(f"reinforcepp {name}: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1


if __name__ == "__main__":
    sys.exit(main())
