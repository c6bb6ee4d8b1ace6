"""Reading a run folder back for an evaluation: its latest complete checkpoint and the settings
it evaluated with.

``reinforcepp eval RUN`` (or ``model=RUN``, ``model=RUN/checkpoints/step_N``,
``model=RUN/checkpoints/step_N/model``) evaluates the checkpoint's model with the run's own
held-out data, generation settings, chat template, prompt column and reward, each unless given,
and samples with the seed the run's own evaluation at that step used, so that the numbers are
the run's. The keys that name code, models, reward sources or environments are never taken
from a run folder (:data:`reinforcepp.run.folder.CHOSEN_BY_YOU`, decided by key): the user gives
them again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import InputError
from ..run import CheckpointManager
from ..run.checkpoint import STEP_PREFIX
from ..run.folder import merge_resumed_config

EVAL_KEYS = (
    "task", "train_data", "eval_data", "eval_fraction", "prompt_column", "use_chat_template", "max_prompt_length",
    "truncate_prompts", "environment", "max_turns", "max_observation_tokens", "reward_funcs", "reward_weights",
    "reward_on_error", "reward_timeout", "reward_step_delimiter", "max_new_tokens", "temperature", "top_p", "top_k",
    "eval_max_prompts", "eval_samples", "eval_temperature", "seed", "sft_wrong_fraction", "dtype", "autocast",
)
"""What an evaluation of a run takes from the run's ``config.yaml`` unless given: which prompts,
how they are rendered, how responses are sampled and scored, and the seed."""

DATA_KEYS = ("task", "train_data", "eval_data", "eval_fraction")
"""Which prompts are held out: taken from the run together, or not at all when you give one."""

_STEP = re.compile(rf"^{STEP_PREFIX}(\d+)$")


@dataclass
class RunCheckpoint:
    """A run folder and the checkpoint of it to evaluate."""

    run_dir: Path
    checkpoint: Path
    step: int

    @property
    def model(self) -> Path:
        return self.checkpoint / "model"


def is_run_dir(path: Path) -> bool:
    """A folder ``reinforcepp train`` wrote: ``config.yaml`` beside ``checkpoints/`` or ``metrics.jsonl``."""
    return (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


def find_checkpoint(model: str) -> Optional[RunCheckpoint]:
    """The run checkpoint ``model`` names (a run folder: its latest complete, intact checkpoint;
    ``RUN/checkpoints/step_N`` or its ``model/``: that one), or None for anything else."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    if is_run_dir(path):
        latest = CheckpointManager(path).latest_intact()
        if latest is None:
            raise InputError(f"model={model} is a run folder without a complete checkpoint to "
                             "evaluate (checkpoints are saved every save_every steps and at the "
                             "end); give model=PATH of another model, or resume the run first")
        return _checkpoint(path, latest)
    step_dir = path.parent if path.name == "model" else path
    if _STEP.match(step_dir.name) and step_dir.parent.name == "checkpoints" and is_run_dir(step_dir.parent.parent):
        if not (step_dir / "COMPLETE").exists():
            raise InputError(f"model={model}: checkpoint {step_dir} is incomplete "
                             "(no COMPLETE marker); the run stopped while writing it")
        return _checkpoint(step_dir.parent.parent, step_dir)
    return None


def _checkpoint(run_dir: Path, checkpoint: Path) -> RunCheckpoint:
    found = RunCheckpoint(run_dir, checkpoint, int(_STEP.match(checkpoint.name).group(1)))  # type: ignore[union-attr]
    if not (found.model / "config.json").is_file():
        what = ("a LoRA adapter only (the merged model is written at the end of the run)"
                if (checkpoint / "adapter").is_dir() else "no model/")
        raise InputError(f"checkpoint {checkpoint} holds {what}: evaluate the run's "
                         "final checkpoint, or load base and adapter in Python")
    return found


def check_model_path(model: str) -> None:
    """A ``model=`` that names a local folder must be a model: a missing folder, or one without
    ``config.json`` (and not a run folder), is refused in one line naming it. A name whose first
    part is no local folder (``Qwen/Qwen2.5-0.5B``) is left to the hub."""
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists() or Path(model.split("/")[0]).is_dir()
    if not looks_local:
        return
    if not path.exists():
        raise InputError(f"model={model}: no such folder (cwd {Path.cwd()})")
    if path.is_dir() and not (path / "config.json").is_file():
        inside = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
        raise InputError(f"model={model} is a folder but not a model: no config.json (it holds {inside}); "
                         "give a Hugging Face model folder, a run folder of `reinforcepp train` or a hub name")
    if path.is_file():
        raise InputError(f"model={model} is a file; give a Hugging Face model folder, a run folder or a hub name")


def eval_settings(found: RunCheckpoint, saved: Mapping[str, Any],
                  given: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The evaluation's settings: the run's :data:`EVAL_KEYS` from its ``config.yaml`` (``saved``)
    under the user's (``given``), with the checkpoint's model. The keys a run folder never decides
    (reward sources, environments: :data:`~reinforcepp.run.folder.CHOSEN_BY_YOU`) must be given
    again (refused otherwise, in one line naming them). Returns the values and one note per
    setting of the run that was not used."""
    from .config import LMConfig

    subset = {k: v for k, v in saved.items() if k in EVAL_KEYS}
    if any(k in given for k in DATA_KEYS):  # your own prompts: none of the run's data settings
        subset = {k: v for k, v in subset.items() if k not in DATA_KEYS}
    values, notes = merge_resumed_config(subset, given, LMConfig.defaults(), what="eval")
    values["model"] = str(found.model)
    return values, notes
