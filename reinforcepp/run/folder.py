"""Run folders: never reuse one by accident, never take security settings from one.

* :func:`claim_run_dir` -- a non-empty run folder is refused unless the run resumes it or the
  user asks to ``--overwrite`` it, which moves the old folder aside (nothing is deleted).
* :func:`merge_resumed_config` -- on resume the run's saved ``config.yaml`` supplies the
  settings, the user's command line and config file win, and security-relevant settings
  (``trust_remote_code``, tokens, anything pointing at a URL, anything naming code to import
  such as ``file.py:function`` reward sources) are never taken from the folder: a received run
  folder must not be able to run code, turn on remote code or send data elsewhere.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import InputError

SECURITY_KEYS = ("trust_remote_code", "remote_token_file", "remote_token", "wandb_project")
"""Keys never read from a run folder (plus every value naming a URL, see :func:`is_remote`)."""


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


_CODE_REF = re.compile(r"^(verl:|openrlhf:)|^[^\s:]+:[^\s:/]+$")


def names_code(value: Any) -> bool:
    """Whether a setting names code to import: ``module:function``, ``file.py:function``,
    ``verl:...``, ``openrlhf:...`` (reward sources) or ``module:Env-v0`` (a Gymnasium id that
    imports its module). A run folder must not make the user import code it ships."""
    if isinstance(value, str):
        return "://" not in value and bool(_CODE_REF.search(value))
    if isinstance(value, (list, tuple)):
        return any(names_code(v) for v in value)
    return False


def is_remote(value: Any) -> bool:
    """Whether a setting names a URL (or a list of settings holds one)."""
    if isinstance(value, str):
        return "://" in value
    if isinstance(value, (list, tuple)):
        return any(is_remote(v) for v in value)
    if isinstance(value, Mapping):
        return any(is_remote(v) for v in value.values())
    return False


def same_setting(saved: Any, given: Any) -> bool:
    """Whether a command-line string ``given`` says the same as the saved (typed) value
    (``true`` = True, ``2e-3`` = 0.002, ``4`` = 4)."""
    if saved == given or str(saved).lower() == str(given).lower():
        return True
    try:
        import yaml

        return bool(yaml.safe_load(str(given)) == saved or float(str(given)) == float(saved))
    except (ValueError, TypeError, yaml.YAMLError):
        return False


def merge_resumed_config(saved: Mapping[str, Any], given: Mapping[str, Any], security_keys: Iterable[str] = SECURITY_KEYS) -> tuple[dict[str, Any], list[str]]:
    """``saved`` (the run's config.yaml) overridden by ``given`` (the user's file and command
    line), security-relevant saved values dropped. Returns the merged values and one note per
    decision worth telling the user: each saved security value not used, each override of a
    saved value. A saved value naming code or a URL that the user does not give again is an
    error (:class:`RunDirError`): resuming without it would train on another reward or reference."""
    security = set(security_keys)
    merged: dict[str, Any] = {}
    notes: list[str] = []
    missing = [f"{k}={v!r}" for k, v in saved.items() if k not in security and k not in given and (is_remote(v) or names_code(v))]
    if missing:  # training on without them would silently change the reward or the reference
        raise RunDirError(
            f"resume: the run folder's config.yaml names code or a URL ({', '.join(missing)}), which is never taken "
            "from a run folder: give it again on the command line (key=value) or in your config file if you trust it"
        )
    for key, value in saved.items():
        if key in security or is_remote(value) or names_code(value):
            if key not in given and value not in (None, False, [], ""):
                what = "it names code to import" if names_code(value) else "security setting"
                notes.append(f"{key}={value!r} in the run folder is not used ({what}: give it on the command line or in your config if you trust it)")
            elif key in given and not same_setting(value, given[key]):
                notes.append(f"{key}: the run folder had {value!r}, using yours, {given[key]!r}")
            continue
        merged[key] = value
    for key, value in given.items():
        if key in merged and not same_setting(merged[key], value) and key not in security and key not in ("resume", "overwrite"):
            notes.append(f"{key}: saved {merged[key]}, now {value} (yours)")
        merged[key] = value
    return merged, notes
