"""No padding in the update (issue 23): token-budget micro-batches, packed forwards, the padding
fraction, and groups spread over the ranks by tokens. The math must not move: 1 micro-batch = K
micro-batches, packed = padded, 1 rank = 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.lm.balance import assign_groups
from reinforcepp.lm.rollout import Rollout
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, reverse_dataset, seeded_rollout, small_config, tiny_policy
from tests.ranks import run_trainer_ranks


def _trainer(path, **overrides):
    tok, model = tiny_policy()
    base = dict(total_steps=2, max_new_tokens=8, temperature=1.3, micro_batch_size=16)
    return Trainer(small_config(path, **{**base, **overrides}), model=model, tokenizer=tok,
                   reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(64))


def _run(path, **overrides):
    from reinforcepp.run.rng import set_seed

    set_seed(0)  # trainers built one after the other share the global generator
    t = _trainer(path, **overrides)
    t.train()
    return t, [r for r in read_metrics(t.run_dir) if r.get("kind") == "train"]


def _close(a, b, atol):
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=0)


def test_assign_groups_by_hand():
    # rank 0 holds groups of 10 and 2 tokens (12), rank 1 of 9 and 1 (10): gap 2. Swapping 10 and 9 closes it
    # (the first such pair; 2 and 1 would too): loads 11 and 11
    assert assign_groups([[10, 2], [9, 1]]) == [[(0, 1), (1, 0)], [(0, 0), (1, 1)]]
    assert assign_groups([[5, 5], [5, 5]]) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]  # balanced already: nothing moves
    # 21 against 1: swapping a 7 for the 1 gives 15 and 7; no swap narrows that further; every rank keeps its count
    assert assign_groups([[7, 7, 7], [1]]) == [[(0, 1), (0, 2), (1, 0)], [(0, 0)]]
    assert assign_groups([[3, 8, 1], [4, 4, 2], [9, 1, 1]]) == assign_groups([[3, 8, 1], [4, 4, 2], [9, 1, 1]])


@pytest.mark.parametrize("estimator", ["reinforce_pp", "grpo", "gae"])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_forwards_train_like_padded_ones(tmp_path, estimator, share_prompt):
    """Update, old and reference log-probs (and the critic's values for gae) on one packed row:
    the same weights and metrics as the padded forwards."""
    settings = dict(estimator=estimator, share_prompt=share_prompt, epochs=2, mini_batch_size=8, micro_batch_size=4)
    padded, mp = _run(tmp_path / "padded", **settings)
    packed, mk = _run(tmp_path / "packed", pack_sequences=True, **settings)
    _close(padded, packed, 1e-5)
    for a, b in zip(mp, mk):
        for key in ("loss/policy", "advantage/std_token", "entropy", "approx_kl", "reward/mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert b["update/padding_fraction"] == 0.0 and a["update/padding_fraction"] > 0.0


def test_one_micro_batch_equals_many_under_a_token_budget(tmp_path):
    whole, mw = _run(tmp_path / "whole", micro_batch_tokens=100_000)
    parts, mp = _run(tmp_path / "parts", micro_batch_tokens=40)
    _close(whole, parts, 1e-5)  # Adam normalises: float rounding of a near-zero gradient shows at ~1e-6
    assert [r["loss/policy"] for r in mw] == pytest.approx([r["loss/policy"] for r in mp], abs=1e-6)
    # with a budget the micro-batches hold whole prompt groups of similar size; packed, nothing is padding
    packed, mk = _run(tmp_path / "packed", micro_batch_tokens=40, pack_sequences=True)
    _close(whole, packed, 1e-5)
    assert all(r["update/padding_fraction"] == 0.0 for r in mk) and all(r["update/padding_fraction"] > 0.0 for r in mp)


def test_token_budget_and_packing_are_checked_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"micro_batch_tokens=12 is smaller than the longest sequence "
                                          r"this run can make, \d+ tokens"):
        _trainer(tmp_path / "small", micro_batch_tokens=12)
    with pytest.raises(ConfigError, match="micro_batch_tokens must be >= 2"):
        small_config(tmp_path, micro_batch_tokens=1)
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, _ = tiny_policy()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match=r"pack_sequences=true, the policy: packed forward: model type 'gpt2'"):
        Trainer(small_config(tmp_path / "gpt2", pack_sequences=True), model=gpt2, tokenizer=tok,
                reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))


PROMPTS, K = 4, 4


def _full_rollout(trainer: Trainer) -> Rollout:
    return seeded_rollout(trainer, [reverse_dataset(PROMPTS, seed=5)[i] for i in range(PROMPTS)], K, seed=321)


def _settings(tmp):
    return dict(prompts_per_step=PROMPTS, samples_per_prompt=K, micro_batch_tokens=60, epochs=2, kl_placement="loss",
                kl_coef=0.1, max_new_tokens=8, temperature=1.5, pack_sequences=True, output_dir=str(tmp))


def _rank_result(rank, world, tmp, out):
    from reinforcepp.lm.balance import balance_ranks

    tok, model = tiny_policy()
    trainer = Trainer(small_config(Path(tmp), **_settings(tmp)), model=model, tokenizer=tok,
                      reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    full = _full_rollout(trainer)
    lengths = [sum(len(full.generation.response_ids[i]) for i in range(g * K, (g + 1) * K)) for g in range(PROMPTS)]
    order = sorted(range(PROMPTS), key=lambda g: lengths[g])  # the two shortest groups on rank 0: unbalanced
    mine = order[:2] if rank == 0 else order[2:]
    part = full.take([g * K + j for g in mine for j in range(K)])
    balanced = balance_ranks(part, trainer.dist, K, share_prompt=True)
    metrics = trainer.update(trainer.make_experience(balanced))
    tokens = sum(len(r) for r in balanced.generation.response_ids)
    torch.save({"loss": metrics["loss/policy"], "params": [p.detach().clone() for p in trainer.policy.parameters()],
                "tokens": tokens, "before": sum(lengths[g] for g in mine)}, f"{out}.{rank}")


def test_groups_spread_over_ranks_by_tokens_and_one_rank_equals_two(tmp_path):
    tok, model = tiny_policy()
    single = Trainer(small_config(tmp_path / "one", **_settings(tmp_path / "one")), model=model, tokenizer=tok,
                     reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    metrics = single.update(single.make_experience(_full_rollout(single)))
    params = [p.detach().clone() for p in single.policy.parameters()]
    out = str(tmp_path / "result")
    run_trainer_ranks(_rank_result, (str(tmp_path / "two"), out))
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    for part in parts:
        for a, b in zip(part["params"], params):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert parts[0]["loss"] == pytest.approx(metrics["loss/policy"], abs=1e-6)
    before = abs(parts[0]["before"] - parts[1]["before"])
    after = abs(parts[0]["tokens"] - parts[1]["tokens"])
    assert before > 0 and after < before  # the response tokens moved towards balance
