"""1 rank == 2 ranks, with a real torch.distributed (gloo) process group on 127.0.0.1.

Each rank holds half of the batch (the halves have different token counts, so averaging
per-rank means would be wrong) and passes :func:`reinforcepp.core.all_reduce_sum` as the
``reduce`` hook. Every statistic, every whitened advantage and the token-mean loss and its
gradient must equal the single-process numbers of the whole batch.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from reinforcepp.core import (
    AdvantageInputs,
    AdvantageParams,
    advantage_stats,
    aggregate,
    all_reduce_sum,
    compute_advantages,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
)
from tests.ranks import run_ranks
from tests.remote.servers import free_port

WORLD = 2
SPLIT = 4  # rank 0 gets rows [0, 4), rank 1 rows [4, 8): 20 vs 26 real tokens


def _batch():
    g = torch.Generator().manual_seed(123)
    n, t = 8, 8
    lengths = torch.tensor([8, 1, 3, 8, 7, 8, 5, 6])
    m = (torch.arange(t)[None] < lengths[:, None]).float()
    pad = lambda x: torch.where(m.bool(), x, torch.full_like(x, 1e6))  # noqa: E731
    return dict(
        x=pad(torch.randn(n, t, generator=g) * 2 + 0.5),
        mask=m,
        rewards=torch.randn(n, generator=g),
        kl=pad(torch.rand(n, t, generator=g)),
        values=pad(torch.randn(n, t, generator=g)),
        old=torch.randn(n, t, generator=g, dtype=torch.float64) - 2,
        logp_delta=0.2 * torch.randn(n, t, generator=g, dtype=torch.float64),
    )


def _compute(b, rows, reduce):
    """Everything the test compares, on the rows ``rows`` of the batch, made global by ``reduce``."""
    m = b["mask"][rows]
    x = b["x"][rows]
    out = {
        "sum": masked_sum(x, m, reduce),
        "mean": masked_mean(x, m, reduce),
        "var": masked_var(x, m, reduce),
        "whiten": masked_whiten(x, m, reduce),
    }
    inputs = AdvantageInputs(b["rewards"][rows], m, samples_per_prompt=2, kl=b["kl"][rows], values=b["values"][rows])
    params = AdvantageParams(kl_coef=0.05, reduce=reduce)
    for name in ("reinforce_pp", "reinforce_pp_baseline", "gae"):
        out[name] = compute_advantages(name, inputs, params).advantages
    no_kl = AdvantageInputs(b["rewards"][rows], m, samples_per_prompt=2)
    out["rloo_whiten"] = compute_advantages("rloo", no_kl, AdvantageParams(whiten=True, reduce=reduce)).advantages
    out["stats"] = torch.tensor(list(advantage_stats(out["reinforce_pp"], m, reduce).values()))
    # token-mean policy loss with the global token count, and its gradient w.r.t. this rank's logprobs
    old = b["old"][rows]
    logp = (old + b["logp_delta"][rows]).requires_grad_(True)
    num_tokens = (reduce or (lambda s: s))(m.sum().reshape(1).double())[0]
    loss = aggregate(policy_loss(logp, old, out["reinforce_pp"].double()).loss, m.double(), num_tokens=num_tokens)
    loss.backward()
    out["loss"] = loss.detach()
    out["grad"] = logp.grad
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        out = _compute(_batch(), rows, all_reduce_sum)
        # the per-rank losses are summed across ranks to give the window loss
        total = out["loss"].clone()
        dist.all_reduce(total)
        out["loss_total"] = total
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    run_ranks(_worker, (free_port(), str(out_dir)), nprocs=WORLD, timeout_s=120)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_workers_leave_this_process_uninitialised(two_rank_results):
    assert not dist.is_initialized()


@pytest.mark.parametrize("key", ["sum", "mean", "var"])
def test_global_statistics_equal_one_rank(two_rank_results, key):
    ref = _compute(_batch(), slice(None), None)[key]
    for r in two_rank_results:
        assert_close(r[key], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("key", ["whiten", "reinforce_pp", "reinforce_pp_baseline", "gae", "rloo_whiten", "grad"])
def test_per_token_results_equal_one_rank(two_rank_results, key):
    ref = _compute(_batch(), slice(None), None)[key]
    got = torch.cat([r[key] for r in two_rank_results])
    assert_close(got, ref, atol=1e-6, rtol=0)


def test_advantage_stats_equal_one_rank(two_rank_results):
    ref = _compute(_batch(), slice(None), None)["stats"]
    for r in two_rank_results:
        assert_close(r["stats"], ref, atol=1e-6, rtol=0)


def test_token_mean_loss_sums_over_ranks_to_one_rank(two_rank_results):
    ref = _compute(_batch(), slice(None), None)["loss"]
    for r in two_rank_results:
        assert_close(r["loss_total"], ref, atol=1e-9, rtol=0)
    assert_close(two_rank_results[0]["loss"] + two_rank_results[1]["loss"], ref, atol=1e-9, rtol=0)


def test_local_statistics_would_differ(two_rank_results):
    # The test can fail: whitening each rank's half on its own gives other advantages.
    b = _batch()
    local = torch.cat([_compute(b, rows, None)["reinforce_pp"] for rows in (slice(0, SPLIT), slice(SPLIT, None))])
    ref = _compute(b, slice(None), None)["reinforce_pp"]
    assert (local - ref).abs().max() > 1e-2
