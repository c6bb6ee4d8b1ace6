"""Run folders: never reuse one by accident, never let one decide what runs or what is trained against.

* :func:`claim_run_dir` -- a non-empty run folder is refused unless the run resumes it or the
  user asks to ``--overwrite`` it, which moves the old folder aside (nothing is deleted).
* :func:`merge_resumed_config` -- on resume the run's saved ``config.yaml`` supplies the
  settings and the user's command line and config file win; the keys that name code, models,
  the reference, reward sources, environments, URLs or tokens (:data:`CHOSEN_BY_YOU`,
  :data:`PERMISSIONS`) are never taken from the folder: a received run folder must not be able
  to run code, choose what is trained against, turn on remote code or send data elsewhere.
* :func:`resumed_config_file`, :func:`check_run_log` -- a run folder that lost its
  ``config.yaml``, its ``metrics.jsonl`` or the log's rows up to the checkpoint is refused on
  resume: it cannot continue as the same run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError


class RunDirError(InputError):
    """A run folder that cannot be used as asked."""


def aside_path(run_dir: Path) -> Path:
    """Where ``--overwrite`` moves an old run: ``RUN.old-YYYYmmdd-HHMMSS`` (numbered if taken)."""
    base = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def claim_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, option: str = "output_dir") -> Path | None:
    """Make ``run_dir`` usable for a new run (or check it for a resumed one).

    A folder that exists and is not empty is refused (:class:`RunDirError`, naming the folder
    and the choices) unless ``resume``; with ``overwrite`` it is moved aside first and the new
    location is returned."""
    run_dir = Path(run_dir)
    if resume or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    if overwrite:
        aside = aside_path(run_dir)
        os.replace(run_dir, aside)
        return aside
    raise RunDirError(
        f"{run_dir} already holds a run: use --resume to continue it, another {option} for a new run, "
        f"or --overwrite to move the old one aside (to {run_dir.name}.old-<time>)"
    )


CHOSEN_BY_YOU: dict[str, str] = {
    "model": "a model",
    "tokenizer": "a tokenizer",
    "ref_model": "the reference model",
    "critic_model": "a model",
    "reward_funcs": "reward sources: code, reward models or URLs",
    "environment": "code: an environment factory",
    "teacher": "a teacher model",
    "rollout_urls": "rollout servers (URLs) that generate and receive the weights",
    "env_id": "the environment",
    "env_kwargs": "the environment's arguments",
}
"""The keys a run folder never decides, with what each names: code to import, models, the
reference, reward sources, environments (LM and gym keys in one table; a config has the ones
it has; a new key that names a path, URL, model or code belongs here, see
``tests/test_run_folder.py``). On resume they come only from the user's command line or config file; a saved value
that differs from the default and is not given again is refused (:func:`merge_resumed_config`).
The decision is by key, never by reading the value, so no spelling of a value slips through."""

PERMISSIONS = ("trust_remote_code", "remote_token_file", "wandb_project")
"""Permissions a run folder never grants (remote code, a token, sending metrics elsewhere):
never taken from it; a saved value that was on is reported as not used."""


def resumed_config_file(run_dir: Any) -> Path | None:
    """The ``config.yaml`` a resumed run starts from: None when ``run_dir`` holds no complete
    checkpoint (nothing to resume; the trainer refuses that itself). A run folder that has a
    checkpoint but lost its config.yaml is refused: resuming on defaults would be another run."""
    from .checkpoint import CheckpointManager

    if run_dir in (None, "", "None", "none"):
        raise RunDirError("--resume continues a run: name its folder (output_dir=RUN)")
    saved = Path(str(run_dir)) / "config.yaml"
    if CheckpointManager(Path(str(run_dir))).latest() is None:
        return None
    if not saved.is_file():
        raise RunDirError(f"resume: {saved} is missing: the run's settings are gone, so it cannot continue as the same "
                          "run; restore the file from where the run was copied, or start a new run")
    return saved


def check_run_log(run_dir: str | Path, step: int) -> None:
    """A run resumed from its checkpoint of ``step`` must still hold its log: ``metrics.jsonl``
    with the row of that step (both trainers write a step's row before its checkpoint). A
    missing or cut file is refused with one line: resuming would continue a history with a hole
    in it (a copied folder without its log, a deleted file, a truncated one)."""
    from .logger import read_rows

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunDirError(f"resume: {path} is missing, but the checkpoint is at step {step}: the run's history is "
                          "gone, so it cannot continue as the same run; restore the file from where the run was "
                          "copied, or start a new run")
    steps = [r.get("step") for r in read_rows(path) if r.get("kind", "train") == "train"]
    if step not in steps:
        last = max((s for s in steps if isinstance(s, (int, float))), default=None)
        raise RunDirError(f"resume: {path} has no row for step {step}, where the checkpoint is (its last train row "
                          f"is at step {last}): the file was cut or replaced; restore it from where the run was "
                          "copied, or start a new run")


def same_setting(saved: Any, given: Any) -> bool:
    """Whether a command-line string ``given`` says the same as the saved (typed) value
    (``true`` = True, ``2e-3`` = 0.002, ``4`` = 4, ``[a, b]`` = ["a", "b"])."""
    if saved == given or str(saved).lower() == str(given).lower():
        return True
    try:
        import yaml

        return bool(yaml.safe_load(str(given)) == saved or float(str(given)) == float(saved))
    except (ValueError, TypeError, yaml.YAMLError):
        return False


def merge_resumed_config(saved: Mapping[str, Any], given: Mapping[str, Any], defaults: Mapping[str, Any],
                         what: str = "resume") -> tuple[dict[str, Any], list[str]]:
    """``saved`` (the run's config.yaml) overridden by ``given`` (the user's file and command
    line). Returns the merged values and one note per decision worth telling the user.

    * A key of :data:`CHOSEN_BY_YOU` is never taken from ``saved``: when the saved value differs
      from the default (``defaults``) and the user does not give the key, resuming would train
      against another model, reward or environment (or run code the folder names), so it is
      refused with one line (:class:`RunDirError`) naming every such key and value.
    * A key of :data:`PERMISSIONS` is never taken from ``saved``; a saved value that was on is
      reported as not used.
    * Every other saved value is used; each override of one by ``given`` is reported.

    ``what`` (``resume``, ``eval``) begins the refusal's line."""
    chosen = [k for k in CHOSEN_BY_YOU if k in saved and k not in given and not same_setting(defaults.get(k), saved[k])]
    if chosen:
        named = ", ".join(f"{k}={saved[k]!r}" for k in chosen)
        names = "; ".join(f"{k}: {CHOSEN_BY_YOU[k]}" for k in chosen)
        raise RunDirError(
            f"{what}: the run folder's config.yaml sets {named} ({names}), which is never taken from a run folder: "
            f"give {'it' if len(chosen) == 1 else 'them'} again on the command line (key=value) or in your config file "
            "if you trust it"
        )
    merged: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in saved.items():
        if key in CHOSEN_BY_YOU or key in PERMISSIONS:
            if key in given and not same_setting(value, given[key]):
                notes.append(f"{key}: the run folder had {value!r}, using yours, {given[key]!r}")
            elif key in PERMISSIONS and key not in given and not same_setting(defaults.get(key), value):
                notes.append(f"{key}={value!r} in the run folder is not used (a permission: give it on the command "
                             "line or in your config if you trust it)")
            continue
        merged[key] = value
    for key, value in given.items():
        if key in merged and not same_setting(merged[key], value) and key not in ("resume", "overwrite"):
            notes.append(f"{key}: saved {merged[key]}, now {value} (yours)")
        merged[key] = value
    return merged, notes
