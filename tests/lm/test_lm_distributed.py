"""1 rank = 2 ranks: the same rollout trained on one process, or split over two gloo ranks,
gives the same advantages, loss and weights (global whitening by all-reduced sums, the loss
normalised by the global token count and scaled by the world size, gradients averaged by DDP)."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from reinforcepp.lm.trainer import Rollout, Trainer
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy

PROMPTS, K = 4, 4


def _settings(tmp):
    return dict(prompts_per_step=PROMPTS, samples_per_prompt=K, micro_batch_size=4, epochs=2, kl_placement="loss", kl_coef=0.1, output_dir=str(tmp))


def _full_rollout(trainer: Trainer) -> Rollout:
    """The same rollout on every process: a fixed seed and the same prompts."""
    rows = [reverse_dataset(PROMPTS, seed=3)[i] for i in range(PROMPTS)]
    torch.manual_seed(123)
    gen, prompts, completions, expanded, result = trainer._generate_and_score(rows, K, trainer._sampling())
    return Rollout(expanded, prompts, completions, gen, result.rewards, result.per_source, {})


def _part(rollout: Rollout, rank: int, world: int) -> Rollout:
    n = len(rollout.prompts) // world
    return rollout.take(list(range(rank * n, (rank + 1) * n)))


def _train_once(trainer: Trainer, rank: int, world: int):
    exp = trainer.make_experience(_part(_full_rollout(trainer), rank, world))
    metrics = trainer.update(exp)
    return exp.advantages, metrics, [p.detach().clone() for p in trainer.policy.parameters()]


def _worker(rank, world, port, tmp, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tok, model = tiny_policy()
    trainer = Trainer(small_config(Path(tmp), **_settings(tmp)), model=model, tokenizer=tok, reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    assert trainer.dist.world_size == world and trainer.prompts_per_rank == PROMPTS // world
    adv, metrics, params = _train_once(trainer, rank, world)
    torch.save({"advantages": adv, "loss": metrics["loss/policy"], "params": params}, f"{out}.{rank}")
    import torch.distributed as dist

    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_equals_two_ranks(tmp_path):
    tok, model = tiny_policy()
    single = Trainer(small_config(tmp_path / "one", **_settings(tmp_path / "one")), model=model, tokenizer=tok, reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    adv, metrics, params = _train_once(single, 0, 1)

    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "two"), out), nprocs=2, join=True, start_method="spawn")
    parts = [torch.load(f"{out}.{r}") for r in range(2)]

    n = adv.shape[0] // 2
    for r, part in enumerate(parts):
        width = part["advantages"].shape[1]
        torch.testing.assert_close(part["advantages"], adv[r * n : (r + 1) * n, :width], atol=1e-5, rtol=0)
        for a, b in zip(part["params"], params):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # Adam normalises: float rounding of a near-zero gradient shows at ~1e-6
    # Each rank logs the global loss (the sum of the ranks' shares).
    assert parts[0]["loss"] == pytest.approx(metrics["loss/policy"], abs=1e-6)
