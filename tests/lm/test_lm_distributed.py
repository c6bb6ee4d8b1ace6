"""1 rank = 2 ranks: the same rollout trained on one process, or split over two gloo ranks,
gives the same advantages, loss and weights (global whitening by all-reduced sums, the loss
normalised by the global token count and scaled by the world size, gradients averaged by DDP)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reinforcepp.lm.rollout import Rollout
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, reverse_dataset, seeded_rollout, small_config, tiny_policy
from tests.ranks import run_trainer_ranks

PROMPTS, K = 4, 4


def _settings(tmp):
    return dict(prompts_per_step=PROMPTS, samples_per_prompt=K, micro_batch_size=4, epochs=2, kl_placement="loss",
                kl_coef=0.1, output_dir=str(tmp))


def _full_rollout(trainer: Trainer) -> Rollout:
    """The same rollout on every process: a fixed seed and the same prompts."""
    return seeded_rollout(trainer, [reverse_dataset(PROMPTS, seed=3)[i] for i in range(PROMPTS)], K, seed=123)


def _part(rollout: Rollout, rank: int, world: int) -> Rollout:
    n = len(rollout.prompts) // world
    return rollout.take(list(range(rank * n, (rank + 1) * n)))


def _train_once(trainer: Trainer, rank: int, world: int):
    exp = trainer.make_experience(_part(_full_rollout(trainer), rank, world))
    metrics = trainer.update(exp)
    return exp.advantages, metrics, [p.detach().clone() for p in trainer.policy.parameters()]


def _rank_result(rank, world, tmp, out):
    tok, model = tiny_policy()
    trainer = Trainer(small_config(Path(tmp), **_settings(tmp)), model=model, tokenizer=tok,
                      reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    assert trainer.dist.world_size == world and trainer.rt.prompts_per_rank == PROMPTS // world
    adv, metrics, params = _train_once(trainer, rank, world)
    torch.save({"advantages": adv, "loss": metrics["loss/policy"], "params": params}, f"{out}.{rank}")


def test_one_rank_equals_two_ranks(tmp_path):
    tok, model = tiny_policy()
    single = Trainer(small_config(tmp_path / "one", **_settings(tmp_path / "one")), model=model, tokenizer=tok,
                     reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    adv, metrics, params = _train_once(single, 0, 1)

    out = str(tmp_path / "result")
    run_trainer_ranks(_rank_result, (str(tmp_path / "two"), out))
    parts = [torch.load(f"{out}.{r}") for r in range(2)]

    n = adv.shape[0] // 2
    for r, part in enumerate(parts):
        width = part["advantages"].shape[1]
        torch.testing.assert_close(part["advantages"], adv[r * n : (r + 1) * n, :width], atol=1e-5, rtol=0)
        for a, b in zip(part["params"], params):
            # Adam normalises: float rounding of a near-zero gradient shows at ~1e-6
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Each rank logs the global loss (the sum of the ranks' shares).
    assert parts[0]["loss"] == pytest.approx(metrics["loss/policy"], abs=1e-6)


def test_torchrun_train_finishes_and_leaves_the_group(tmp_path):
    """`torchrun --nproc_per_node 2 -m reinforcepp.cli train`: both ranks train, leave the process
    group after the trainer is released (end_distributed) and exit 0; rank 0 writes the run."""
    run = tmp_path / "run"
    settings = [f"output_dir={run}", "total_steps=2", "sft_steps=0", "eval_every=0", "prompts_per_step=4",
                "samples_per_prompt=2", "progress=false", "torch_threads=1"]
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "reinforcepp.cli", "train", *settings]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2]
    assert proc.stdout.count("plots:") == 1  # rank 0 reports
    assert "`past_key_values` is deprecated" not in proc.stderr  # the cache argument is read through DDP
    assert "FutureWarning" not in proc.stderr, proc.stderr[-3000:]
