"""Gloo ranks for the "1 rank = 2 ranks" tests: spawned, joined with a deadline, and ended in
the order :func:`reinforcepp.lm.distributed.end_distributed` asks for."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

from reinforcepp.lm.distributed import end_distributed
from tests.remote.servers import free_port


def run_ranks(fn: Callable[..., Any], args: tuple, nprocs: int = 2, timeout_s: float = 600) -> None:
    """``fn(rank, *args)`` on ``nprocs`` spawned processes. A rank that raises fails the test with
    its traceback; ranks still running after ``timeout_s`` are killed and the test fails, rather
    than the whole suite hanging."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs} gloo ranks did not finish within {timeout_s:.0f} s")


def _trainer_rank(rank: int, body: Callable[..., None], world: int, port: int, args: tuple) -> None:
    # the group described the way torchrun does; the Trainer joins it (init_distributed)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    body(rank, world, *args)  # builds its trainers; they (and DDP's reducer) are released on return
    end_distributed()


def run_trainer_ranks(body: Callable[..., None], args: tuple, world: int = 2, timeout_s: float = 600) -> None:
    """``body(rank, world, *args)`` on ``world`` gloo ranks, as torchrun would run a trainer;
    ``body`` is a module-level function (spawn pickles it by name)."""
    run_ranks(_trainer_rank, (body, world, free_port(), args), nprocs=world, timeout_s=timeout_s)
