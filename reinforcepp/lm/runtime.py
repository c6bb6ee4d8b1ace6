"""Where and how one language-model run executes: its folder, checkpoints, device, ranks and precision.

:func:`open_runtime` decides all of it once, before any model loads, from the config and the
launch (``torchrun`` or not); every component is then built from the :class:`Runtime` it returns.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import ConfigError
from ..run import CheckpointManager
from ..run.checkpoint import step_of
from ..run.folder import RunDirError, check_run_log, claim_run_dir
from ..run.rng import set_seed
from ..run.timer import PhaseTimer
from .config import LMConfig
from .distributed import DistContext, init_distributed
from .models import resolve_device, resolve_dtype, set_torch_threads
from .parallel import Parallel, check_launch
from .precision import autocast, autocast_dtype


class RunFolder:
    """Where a run writes, and from when.

    When the run names its folder (``output_dir``), resumes it, or runs on several ranks, the
    folder is claimed (:func:`~reinforcepp.run.folder.claim_run_dir`) at once and every file is
    written as the run is set up. Otherwise (``Trainer(...)`` in Python or ``reinforcepp eval``
    without ``output_dir``) nothing is written until training starts: what the setup makes (the
    built-in task's data) waits in a temporary directory, what it records (the reference) waits
    as a function, and :meth:`open` moves and writes them into the folder. A trainer that only
    evaluates leaves nothing behind."""

    def __init__(self, path: Path, *, eager: bool, resume: bool, overwrite: bool) -> None:
        self.path = path
        self.eager = eager
        self.opened = False
        self._resume, self._overwrite = resume, overwrite
        self._staging = None if eager else tempfile.TemporaryDirectory(prefix="reinforcepp-run-")
        self._pending: list[Callable[[Path], None]] = []
        if eager:
            self.open()

    def staging(self) -> Path:
        """Where the setup writes its files now: the run folder once open, a temporary one before."""
        return self.path if self._staging is None else Path(self._staging.name)

    def when_open(self, write: Callable[[Path], None]) -> None:
        """``write(run_dir)`` now if the folder is open, else when it opens."""
        if self.opened:
            write(self.path)
        else:
            self._pending.append(write)

    def open(self) -> None:
        """Claim the folder (rank 0: a non-empty one is refused unless resumed or overwritten), move
        the staged files in and run the pending writes. Once; later calls do nothing."""
        if self.opened:
            return
        if int(os.environ.get("RANK", "0")) == 0:
            claim_run_dir(self.path, resume=self._resume, overwrite=self._overwrite)
        self.opened = True
        if self._staging is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            for item in sorted(Path(self._staging.name).iterdir()):
                shutil.move(str(item), str(self.path / item.name))
            self._staging.cleanup()
            self._staging = None
        for write in self._pending:
            write(self.path)
        self._pending.clear()


@dataclass
class Runtime:
    builtin_task: Optional[str]
    """the built-in task whose data and reward this run uses (None: the user's own)"""
    run_dir: Path
    checkpoints: CheckpointManager
    resume_from: Optional[Path]
    """the checkpoint a resumed run continues from"""
    device: torch.device
    dist: DistContext
    dtype: torch.dtype
    """compute dtype of the models (``dtype``)"""
    parallel: Parallel
    """how the models are held: one process, DDP or FSDP2"""
    autocast_dtype: Optional[torch.dtype]
    """bfloat16 autocast around the forwards, or None"""
    prompts_per_rank: int
    folder: RunFolder
    """when the run folder is claimed and written (at once, or when training starts)"""
    timer: PhaseTimer = field(default_factory=PhaseTimer)

    def precision(self) -> Any:
        """bfloat16 autocast around the models' forwards when it is on (precision.py)."""
        return autocast(self.device, self.autocast_dtype)


def setup_torch(config: LMConfig) -> None:
    """Quiet library progress bars, threads, determinism, the seed."""
    import datasets
    import transformers

    datasets.disable_progress_bars()  # our own bar shows progress; theirs only adds noise
    transformers.utils.logging.disable_progress_bar()
    set_torch_threads(config.torch_threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    set_seed(config.seed)


def default_run_dir(config: LMConfig, builtin_task: Optional[str]) -> str:
    data = config.train_data or config.eval_data
    what = builtin_task or (Path(data).stem if data else "custom")
    return f"runs/{what}-{config.estimator}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_runtime(config: LMConfig, *, given_data: bool) -> Runtime:
    """The run folder (claimed by rank 0), the checkpoint to resume from, the device, the
    process group, the dtypes and the parallelism. ``given_data``: datasets were passed in
    Python, so no built-in task runs."""
    if given_data and config.task is not None:
        raise ConfigError(f"task={config.task} is a built-in task with its own data; "
                          "it cannot be combined with train_dataset/eval_dataset")
    builtin_task = None if given_data else config.builtin_task
    run_dir = Path(config.output_dir or default_run_dir(config, builtin_task))
    checkpoints = CheckpointManager(run_dir, keep_last=config.keep_last)
    resume_from = checkpoints.latest_intact() if config.resume else None
    if config.resume and resume_from is None:
        raise RunDirError(nothing_to_resume(config, run_dir))
    if resume_from is not None and int(os.environ.get("RANK", "0")) == 0:
        check_run_log(run_dir, step_of(resume_from))
    eager = config.output_dir is not None or config.resume or int(os.environ.get("WORLD_SIZE", "1")) > 1
    # rank 0 owns the run folder
    folder = RunFolder(run_dir, eager=eager, resume=config.resume, overwrite=config.overwrite)
    device = resolve_device(config.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.rank)))
    check_launch(config.fsdp, config.ref_offload, dist.world_size)
    if config.prompts_per_step % dist.world_size:
        raise ConfigError(f"prompts_per_step={config.prompts_per_step} does not split over {dist.world_size} ranks")
    dtype = resolve_dtype(config.dtype, device)
    parallel = Parallel(dist, device, fsdp=config.fsdp, compute_dtype=dtype, ref_offload=config.ref_offload,
                        full_finetune=not config.lora_rank)
    # None = off; dtype=bfloat16 without FSDP computes under autocast over float32 master weights
    amp = autocast_dtype(config.autocast, device) or parallel.autocast_dtype
    return Runtime(builtin_task, run_dir, checkpoints, resume_from, device, dist, dtype, parallel, amp,
                   config.prompts_per_step // dist.world_size, folder)


def nothing_to_resume(config: LMConfig, run_dir: Path) -> str:
    """Why ``run_dir`` cannot be resumed (no complete checkpoint), with the command that starts the
    run again and the ``save_every`` that would have left a checkpoint."""
    from ..run.logger import read_rows

    metrics = run_dir / "metrics.jsonl"
    steps = [r["step"] for r in read_rows(metrics) if r.get("kind", "train") == "train"] if metrics.exists() else []
    every = config.save_every or 10
    again = restart_command(config, run_dir, save_every=every)
    if not steps and not (run_dir.is_dir() and any(run_dir.iterdir())):
        return f"resume=true but {run_dir} holds no run to resume; start one with `{again.replace(' --overwrite', '')}`"
    when = ("it was set to save only at the end (save_every=0)" if not config.save_every
            else f"it stopped before its first checkpoint (save_every={config.save_every})")
    stopped = f"it logged {max(steps)} of {config.total_steps} steps; " if steps else ""
    return (f"resume=true but {run_dir} holds no complete checkpoint: {stopped}{when}. Start it again with `{again}` "
            f"(--overwrite moves the old folder aside); save_every={every} keeps a checkpoint every {every} steps")


def restart_command(config: LMConfig, run_dir: Path, **changes: Any) -> str:
    """``reinforcepp train --overwrite output_dir=RUN k=v ...``: the settings of ``config`` (and
    ``changes``) that differ from what the command would default to, in declaration order."""
    values = config.resolved()
    values.update(changes)
    named = {k: values[k] for k in ("model", "task", "train_data", "eval_data", "lora_rank")
             if values.get(k) not in (None, 0)}
    base = (LMConfig.tiny(**{k: v for k, v in named.items() if k != "model"}) if config.model is None
            else LMConfig.from_dict(named)).resolved()
    skip = {"output_dir", "resume", "overwrite"}
    items = [f"{k}={_cli_value(v)}" for k, v in values.items() if k not in skip and (k in named or v != base.get(k))]
    return " ".join(["reinforcepp train --overwrite", f"output_dir={shlex.quote(str(run_dir))}", *items])


def _cli_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        joined = ",".join(str(v) for v in value)
        return shlex.quote(joined if value and not any("," in str(v) for v in value) else f"[{joined}]")
    return shlex.quote("none" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
