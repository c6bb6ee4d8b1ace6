"""Where the time goes: phase times and the update's FLOP/s utilisation.

Utilisation = achieved FLOP/s of the update / the machine's measured matmul FLOP/s, with the
update's work estimated the usual way (Kaplan et al. 2020): ``6 * n_params`` FLOPs per token
for a forward and backward pass (attention's extra term ignored, so small models are slightly
underestimated). Only real tokens count; compute spent on padding is part of the inefficiency.
"""

from __future__ import annotations

import time

import torch


def matmul_flops_per_s(size: int = 512, seconds: float = 0.3, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> float:
    """Measured dense matmul throughput (``2 n^3`` FLOPs per ``n x n`` product) with the current
    thread setting: the denominator of the utilisation."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)  # warm up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start)


def update_flops(n_params: int, tokens: int) -> float:
    """Forward + backward FLOPs of ``tokens`` tokens through a model of ``n_params`` parameters."""
    return 6.0 * n_params * tokens


def summary(rows: list[dict], peak_flops: float) -> str:
    """A table of mean time per phase (seconds per step and share of the step), tokens per
    second and the update's utilisation, from the train rows of ``metrics.jsonl``."""
    phases = sorted({k for r in rows for k in r if k.startswith("time/")})
    n = max(1, len(rows))
    means = {p: sum(r.get(p, 0.0) for r in rows) / n for p in phases}
    total = sum(means.values()) or 1.0
    lines = [f"{'phase':<16}{'s/step':>10}{'share':>9}", "-" * 35]
    lines += [f"{p[5:]:<16}{means[p]:>10.4f}{means[p] / total:>8.1%}" for p in phases]
    lines.append(f"{'total':<16}{total:>10.4f}")
    tps = sum(r.get("tokens_per_s", 0.0) for r in rows) / n
    achieved = sum(r.get("perf/update_flops_per_s", 0.0) for r in rows) / n
    lines.append(f"generated tokens/s: {tps:,.0f}")
    lines.append(f"update: {achieved / 1e9:,.2f} GFLOP/s achieved of {peak_flops / 1e9:,.2f} "
                 f"GFLOP/s measured matmul peak = {achieved / peak_flops:.1%} utilisation")
    return "\n".join(lines)


def update_tokens(batch, micro_batch_size: int, share_prompt: bool) -> int:
    """Real tokens one pass of the update computes over ``batch`` (a ``PromptResponseBatch``) cut
    into micro-batches of ``micro_batch_size`` rows: every response token, plus the prompt tokens,
    each distinct prompt of a micro-batch counted once when ``share_prompt`` runs it once for all
    its samples (otherwise once per sample). (:func:`~.micro_batches.update_token_counts`)"""
    from .micro_batches import plan, prompt_groups, update_token_counts

    micro = plan(batch.attention_mask, batch.input_ids, batch.response_length, micro_batch_size=micro_batch_size,
                 micro_batch_tokens=None, share_prompt=share_prompt)
    groups = prompt_groups(batch.input_ids, batch.response_length) if share_prompt else None
    return update_token_counts(batch.attention_mask, batch.response_length, micro, packed=True, groups=groups)[1]
