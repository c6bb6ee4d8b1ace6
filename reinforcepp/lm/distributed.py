"""Data parallelism over ``torch.distributed`` ranks (launched with ``torchrun``).

Every rank handles ``prompts_per_step / world_size`` prompts of each step: it generates and scores
them, and keeps its groups whole (group baselines need no communication). What must be global is
made global by summing, never by averaging per-rank means (docs/algorithms.md, "Normalisation:
token-weighted, over the global batch"):

* whitening statistics: the core's ``reduce`` hook all-reduces the partial sums;
* the loss normaliser: each optimizer window's token (and sequence) count is all-reduced, so
  each rank's loss is its share of the global ``token-mean``;
* gradients: reduced in the backward pass by DDP or FSDP2 (``parallel.py``, which also says
  how the models are held), scaled so that every rank takes exactly the step one process would
  take on the whole batch (tested: 1 rank = 2 ranks, DDP and FSDP2).

Logging, evaluation and checkpoints happen on rank 0; metrics are reduced first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..core import Reduce, all_reduce_sum


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def reduce(self) -> Optional[Reduce]:
        """The core's reduction hook: ``None`` on one process, an all-reduce of sums otherwise."""
        return all_reduce_sum if self.enabled else None

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0])

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean over ranks (every rank holds the same number of responses), min/max for keys
        ending in ``/min`` / ``/max``, sums for counts."""
        if not self.enabled:
            return metrics
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(metrics))
        keys = sorted(set().union(*gathered))  # a key one rank lacks counts as 0 there
        values = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64)
        total, low, high = values.clone(), values.clone(), values.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        out = {}
        for i, k in enumerate(keys):
            if k.endswith(("/min", "_min")):
                out[k] = float(low[i])
            elif k.endswith(("/max", "_max")) or k.startswith("time/"):
                out[k] = float(high[i])  # the slowest rank sets the step time
            elif k in ("reward/dropped_samples", "reward/dropped_groups", "filter/dropped_groups", "response/tokens"):
                out[k] = float(total[i])
            else:
                out[k] = float(total[i]) / self.world_size
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device_type: str) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``...); a plain single process when there is none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())


def end_distributed() -> None:
    """Leave the process group, once the models that hold it (DDP's reducer, FSDP's state) are
    gone: call it after the :class:`~reinforcepp.lm.trainer.Trainer` is released.

    The order matters with gloo. Its process group joins its worker threads when the last
    reference goes; a worker thread may still need the GIL to free the tensors of its last
    collective. Python's own reference (released here) drops the group without the GIL held; if
    instead DDP's reducer held the last reference, the reducer's destructor would join the
    threads while holding the GIL, and the process would hang at exit (PyTorch issue 56297).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    import gc

    gc.collect()  # reference cycles may still hold a DDP wrapper
    dist.barrier()
    dist.destroy_process_group()
