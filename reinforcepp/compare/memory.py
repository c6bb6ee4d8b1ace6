"""Memory measurement of one ``reinforcepp compare`` run, made by the run's own (child) process.

:func:`peak_rss_mb` (this process's peak resident set size, ``getrusage(RUSAGE_SELF)``, so the number
belongs to this run alone), :func:`proc_status_mb` (``VmRSS`` / ``VmHWM`` from /proc),
:func:`reset_peak_rss` (so that ``VmHWM`` afterwards is the training loop's peak) and
:func:`state_mb` (the exact bytes of the tensors a trainer keeps). ``docs/compare.md`` explains them.
"""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (``getrusage(RUSAGE_SELF).ru_maxrss``)."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak_kb / 2**20 if sys.platform == "darwin" else peak_kb / 1024


def state_mb(trainer: Any) -> float:
    """Bytes (in MB) of every distinct tensor the trainer keeps between steps: the parameters
    and buffers of the policy, reference and critic, their gradients and the optimizers' state.
    Exact, and what grows with the model size (unlike the runtime's own few hundred MB)."""
    import torch

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            seen.setdefault(t.data_ptr(), t.numel() * t.element_size())

    for name in ("policy", "ref_model", "critic"):
        module = getattr(trainer, name, None)
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                add(p)
                add(p.grad)
            for b in module.buffers():
                add(b)
    for name in ("optimizer", "critic_optimizer"):
        opt = getattr(trainer, name, None)
        for state in getattr(opt, "state", {}).values():
            for v in state.values():
                add(v)
    return sum(seen.values()) / 2**20


def proc_status_mb(field_name: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident high-water mark) from /proc, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: ``5`` > /proc/self/clear_refs),
    so that ``VmHWM`` afterwards is the peak of the training loop alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
