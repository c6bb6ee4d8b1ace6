"""trust_region=natural in the language-model trainer (issue 24, item 1): every sum of the step
(the gradient, the Fisher-vector products, the line search's surrogate and KL) runs micro-batch
by micro-batch and over the ranks, so the step must not depend on how the rollout is split:
1 micro-batch = K micro-batches, 1 rank = 2 ranks."""

from __future__ import annotations

from pathlib import Path

import torch

from reinforcepp.lm.rollout import Rollout
from reinforcepp.lm.trainer import Trainer
from tests.lm.helpers import fraction_of_a, reverse_dataset, seeded_rollout, small_config, tiny_policy
from tests.ranks import run_trainer_ranks

K, PROMPTS = 4, 4


def _trainer(tmp: Path, **overrides) -> Trainer:
    settings = dict(prompts_per_step=PROMPTS, samples_per_prompt=K, trust_region="natural", max_new_tokens=8,
                    temperature=1.5, max_kl=0.02, output_dir=str(tmp))
    tok, model = tiny_policy()
    return Trainer(small_config(tmp, **{**settings, **overrides}), model=model, tokenizer=tok,
                   reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))


def _full_rollout(trainer: Trainer) -> Rollout:
    """The same ``PROMPTS x K`` samples whoever draws them (fixed seed, fixed rows)."""
    return seeded_rollout(trainer, [reverse_dataset(PROMPTS, seed=5)[i] for i in range(PROMPTS)], K, seed=321)


def _step(trainer: Trainer, rollout: Rollout) -> tuple[dict, list[torch.Tensor]]:
    metrics = trainer.update(trainer.make_experience(rollout))
    return metrics, [p.detach().clone() for p in trainer.policy.parameters()]


def _assert_same_step(a: tuple[dict, list[torch.Tensor]], b: tuple[dict, list[torch.Tensor]]) -> None:
    (ma, pa), (mb, pb) = a, b
    assert ma["natural/accepted_fraction"] > 0  # a step was taken, so equal weights mean equal steps
    assert ma["natural/accepted_fraction"] == mb["natural/accepted_fraction"]
    assert abs(ma["natural/step_kl"] - mb["natural/step_kl"]) < 1e-6
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


def test_one_micro_batch_equals_many(tmp_path):
    one = _trainer(tmp_path / "one", micro_batch_size=PROMPTS * K)
    expected = _step(one, _full_rollout(one))
    many = _trainer(tmp_path / "many", micro_batch_size=4)
    _assert_same_step(_step(many, _full_rollout(many)), expected)
    budget = _trainer(tmp_path / "budget", micro_batch_tokens=40)  # micro-batches of unequal counts
    _assert_same_step(_step(budget, _full_rollout(budget)), expected)


def _rank_result(rank, world, tmp, out):
    trainer = _trainer(Path(tmp), micro_batch_size=4)
    full = _full_rollout(trainer)
    half = PROMPTS // world
    part = full.take([g * K + j for g in range(rank * half, (rank + 1) * half) for j in range(K)])
    metrics, params = _step(trainer, part)
    torch.save({"metrics": metrics, "params": params}, f"{out}.{rank}")


def test_one_rank_equals_two(tmp_path):
    single = _trainer(tmp_path / "one", micro_batch_size=4)
    expected = _step(single, _full_rollout(single))
    out = str(tmp_path / "result")
    run_trainer_ranks(_rank_result, (str(tmp_path / "two"), out))
    for rank in range(2):
        part = torch.load(f"{out}.{rank}")
        _assert_same_step((part["metrics"], part["params"]), expected)
