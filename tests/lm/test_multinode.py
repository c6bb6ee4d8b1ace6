"""Training across machines, as far as one machine allows: two torchrun "nodes" on 127.0.0.1
(`--nnodes 2`, c10d rendezvous, one process each, two subprocesses) train exactly as one node with
two ranks, under DDP and FSDP; the run folder is written once (by global rank 0, whichever node
it lands on), and the run resumes on another node count (one node of two ranks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reinforcepp.run import read_metrics
from tests.remote.servers import ROOT, free_port

SETTINGS = [
    "sft_steps=0",
    "eval_every=0",
    "total_steps=3",
    "save_every=1",
    "keep_last=3",
    "prompts_per_step=4",
    "samples_per_prompt=2",
    "max_new_tokens=4",
    "micro_batch_size=8",
    "progress=false",
    "tensorboard=false",
    "torch_threads=1",
    "log_samples_every=0",
]
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def _torchrun(
    nnodes: int, nproc: int, node_rank: int, port: int, run: Path, *extra: str, resume: bool = False
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        str(nproc),
        "--node-rank",
        str(node_rank),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"test-{port}",
        "--max-restarts",
        "0",
        "-m",
        "reinforcepp.cli",
        "train",
        *(["--resume"] if resume else []),
        f"output_dir={run}",
        *SETTINGS,
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=run.parent)


def _wait(*procs: subprocess.Popen) -> None:
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("torchrun did not finish within 900 s")
        outs.append((p.returncode, err))
    for code, err in outs:
        assert code == 0, err[-3000:]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model" / "model.safetensors"))


def _one_node(run: Path, *extra: str, resume: bool = False) -> None:
    _wait(_torchrun(1, 2, 0, free_port(), run, *extra, resume=resume))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("fsdp=true",)], ids=["ddp", "fsdp"])
def test_two_nodes_train_as_one_node_of_two_ranks_and_resume_on_one_node(tmp_path, extra):
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    _one_node(one, *extra)
    port = free_port()
    _wait(*(_torchrun(2, 1, node, port, two, *extra) for node in (0, 1)))

    rows = {name: [r for r in read_metrics(run) if r["kind"] == "train"] for name, run in (("one", one), ("two", two))}
    assert [r["step"] for r in rows["two"]] == [1, 2, 3]  # logged once, by global rank 0
    for a, b in zip(rows["one"], rows["two"]):
        assert b["reward/mean"] == a["reward/mean"] and b["loss/policy"] == pytest.approx(a["loss/policy"], abs=1e-6)
    expected = _weights(one, 3)
    for name, value in _weights(two, 3).items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0)
    checkpoints = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert checkpoints == ["step_00000001", "step_00000002", "step_00000003"]  # written once, nothing half-written left
    assert len(list((two / "checkpoints" / "step_00000003" / "model").glob("*.safetensors"))) == 1

    # the two-node run, cut after step 2, resumes on one node of two ranks and ends where the others did
    shutil.rmtree(two / "checkpoints" / "step_00000003")
    _one_node(two, *extra, resume=True)
    assert [r["step"] for r in read_metrics(two) if r["kind"] == "train"] == [1, 2, 3]
    for name, value in _weights(two, 3).items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0)
