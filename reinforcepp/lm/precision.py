"""Mixed precision for the language model's forward passes: bfloat16 autocast over float32 weights.

Matrix products run in bfloat16 where the hardware has fast bfloat16 units (CUDA GPUs with
bf16 support; x86 CPUs with AMX or AVX512-BF16), while the weights, the optimizer state, the
float32 log-softmax (``logprobs_from_logits`` upcasts the logits) and everything in
``reinforcepp.core`` stay float32. Measured on an AVX512-BF16 CPU with one thread: a forward and
backward of a 2.6M-35M parameter Llama takes 0.64-0.70x the float32 time (docs/lm.md, "Speed").
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when ``/proc/cpuinfo`` lists ``amx_bf16`` or ``avx512_bf16`` (Linux; False elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: None for ``"off"``; bfloat16 for ``"bfloat16"``; for
    ``"auto"``, bfloat16 where the device computes it fast, else None."""
    if setting == "off":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` for ``device`` at ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
