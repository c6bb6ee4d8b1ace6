"""Where and how one language-model run executes: its folder, checkpoints, device, ranks and precision.

:func:`open_runtime` decides all of it once, before any model loads, from the config and the
launch (``torchrun`` or not); every component is then built from the :class:`Runtime` it returns.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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
        raise ConfigError(f"task={config.task} is a built-in task with its own data; it cannot be combined with train_dataset/eval_dataset")
    builtin_task = None if given_data else config.builtin_task
    run_dir = Path(config.output_dir or default_run_dir(config, builtin_task))
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 owns the run folder
        claim_run_dir(run_dir, resume=config.resume, overwrite=config.overwrite)
    checkpoints = CheckpointManager(run_dir, keep_last=config.keep_last)
    resume_from = checkpoints.latest_intact() if config.resume else None
    if config.resume and resume_from is None:
        raise RunDirError(f"resume=true but {run_dir} holds no complete checkpoint")
    if resume_from is not None and int(os.environ.get("RANK", "0")) == 0:
        check_run_log(run_dir, step_of(resume_from))
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
                   config.prompts_per_step // dist.world_size)
