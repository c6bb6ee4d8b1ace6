"""Data parallelism over ``torch.distributed`` ranks (launched with ``torchrun``).

Every rank holds a full copy of the policy and handles ``prompts_per_step / world_size``
prompts of each step: it generates and scores them, and keeps its groups whole (group baselines
need no communication). What must be global is made global by summing, never by averaging
per-rank means (ALGORITHM.md):

* whitening statistics: the core's ``reduce`` hook all-reduces the partial sums;
* the loss normaliser: each optimizer window's token (and sequence) count is all-reduced, so
  each rank's loss is its share of the global ``token-mean``;
* gradients: summed over ranks before clipping, so every rank takes the same step, exactly the
  step one process would take on the whole batch (tested: 1 rank = 2 ranks).

Logging, evaluation and checkpoints happen on rank 0; metrics are reduced first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

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

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` over ranks in one flat all-reduce (a missing grad counts as zero)."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

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
            if k.endswith("/min"):
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
