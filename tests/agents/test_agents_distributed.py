"""Multi-turn episodes: 1 rank = 2 gloo ranks, and resume = uninterrupted."""

from pathlib import Path

import pytest
import torch

from reinforcepp.lm.trainer import Trainer
from reinforcepp.run import read_metrics
from tests.agents.envs import TurnRewardEnv
from tests.lm.helpers import reverse_dataset, seeded_rollout, small_config, tiny_policy
from tests.ranks import run_trainer_ranks

PROMPTS, K = 4, 4


def _settings(tmp):
    return {"prompts_per_step": PROMPTS, "samples_per_prompt": K, "micro_batch_size": 4, "epochs": 2,
            "kl_placement": "loss", "kl_coef": 0.1, "max_new_tokens": 4, "max_turns": 2, "output_dir": str(tmp)}


def _trainer(tmp) -> Trainer:
    tok, model = tiny_policy()
    return Trainer(small_config(Path(tmp), **_settings(tmp)), model=model, tokenizer=tok,
                   train_dataset=reverse_dataset(16), env=TurnRewardEnv)


def _train_once(trainer: Trainer, rank: int, world: int):
    # the same episodes on every process
    full = seeded_rollout(trainer, [reverse_dataset(PROMPTS, seed=3)[i] for i in range(PROMPTS)], K, seed=123)
    n = len(full.prompts) // world
    exp = trainer.make_experience(full.take(list(range(rank * n, (rank + 1) * n))))
    metrics = trainer.update(exp)
    return exp.advantages, exp.response_mask, metrics, [p.detach().clone() for p in trainer.policy.parameters()]


def _rank_result(rank, world, tmp, out):
    trainer = _trainer(tmp)
    assert trainer.dist.world_size == world
    adv, mask, metrics, params = _train_once(trainer, rank, world)
    torch.save({"advantages": adv, "mask": mask, "loss": metrics["loss/policy"], "params": params}, f"{out}.{rank}")


def test_one_rank_equals_two_ranks_with_episodes(tmp_path):
    adv, mask, metrics, params = _train_once(_trainer(tmp_path / "one"), 0, 1)
    assert (mask == 0).any(), "the episodes have observation tokens"
    out = str(tmp_path / "result")
    run_trainer_ranks(_rank_result, (str(tmp_path / "two"), out))
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    n = adv.shape[0] // 2
    for r, part in enumerate(parts):
        width = part["advantages"].shape[1]
        torch.testing.assert_close(part["mask"], mask[r * n : (r + 1) * n, :width], atol=0, rtol=0)
        torch.testing.assert_close(part["advantages"], adv[r * n : (r + 1) * n, :width], atol=1e-5, rtol=0)
        for a, b in zip(part["params"], params):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert parts[0]["loss"] == pytest.approx(metrics["loss/policy"], abs=1e-6)


def test_resume_equals_uninterrupted_with_episodes(tmp_path):
    common = {"total_steps": 4, "save_every": 2, "deterministic": True, "epochs": 2, "mini_batch_size": 8,
              "max_new_tokens": 4, "max_turns": 2, "kl_placement": "reward"}

    def make(path, **kw):
        tok, model = tiny_policy()
        return Trainer(small_config(path, **common, **kw), model=None if kw.get("resume") else model, tokenizer=tok,
                       train_dataset=reverse_dataset(64), env=TurnRewardEnv)

    full = make(tmp_path / "full")
    full.train()
    first = make(tmp_path / "cut")
    original_step = first.train_step

    def crash_after_two():
        if first.step == 2:
            raise KeyboardInterrupt("killed")
        return original_step()

    first.train_step = crash_after_two
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = make(tmp_path / "cut", resume=True)
    assert resumed.step == 2
    resumed.train()
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    def keep(r):
        return {k: v for k, v in r.items() if k.startswith(("env/", "reward/", "response/"))}

    assert [keep(r) for r in read_metrics(full.run_dir)] == [keep(r) for r in read_metrics(resumed.run_dir)]
