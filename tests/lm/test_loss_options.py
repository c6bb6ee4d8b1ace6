"""The loss options in the trainer: mask_truncated_completions, reference refresh, GSPO's
sequence ratio and k3+ in a real step, TRL's scale_rewards, the entropy term's name, pass@k in
evaluation, the eval tags in TensorBoard, and dynamic filtering refused with one sample."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.config import ConfigError
from reinforcepp.lm.config import LMConfig
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run.logger import _tag
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy

torch.set_num_threads(1)


def make(tmp_path, **overrides):
    tok, model = tiny_policy()
    return Trainer(small_config(tmp_path, **overrides), model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
                   train_dataset=reverse_dataset(32))


def test_mask_truncated_completions_equals_the_loss_without_them(tmp_path):
    trainer = make(tmp_path, mask_truncated_completions=True)
    rollout = trainer.rollout()
    # an untrained model rarely stops: mark every third response truncated (the option reads only this flag)
    truncated = torch.arange(len(rollout.rewards)) % 3 == 0
    rollout.generation.truncated = truncated
    exp = trainer.make_experience(rollout)
    assert exp.loss_mask is not None and bool((exp.loss_mask[truncated] == 0).all())
    kept = torch.nonzero(~truncated).flatten()
    lm = exp.loss_mask
    masked = trainer.updater.micro_loss(
        exp, float(lm.sum()), float((lm.sum(1) > 0).sum()), defaultdict(list), defaultdict(list)
    )
    sub = exp.select(kept)
    sub.loss_mask = None
    alone = trainer.updater.micro_loss(
        sub, float(sub.response_mask.sum()), float(len(kept)), defaultdict(list), defaultdict(list)
    )
    assert_close(masked, alone, atol=1e-6, rtol=0)


def test_reference_refresh_copies_the_policy_and_is_checkpointed(tmp_path):
    trainer = make(tmp_path, kl_placement="loss", ref_update_every=2, ref_update_alpha=1.0, total_steps=2)
    initial = [p.detach().clone() for p in trainer.ref_model.parameters()]
    m1 = trainer.train_step()
    assert "kl/ref_updated" not in m1
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.ref_model.parameters()))
    m2 = trainer.train_step()
    assert m2["kl/ref_updated"] == 1.0
    assert all(torch.equal(r, p) for r, p in zip(trainer.ref_model.parameters(), trainer.policy.parameters()))
    path = trainer.save_checkpoint()
    assert (path / "reference" / "config.json").exists()


@pytest.mark.parametrize("overrides", [
    {"importance_sampling_level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4, "estimator": "grpo"},
    {"kl_placement": "loss", "kl_estimator": "k3+", "epochs": 2},
    {"estimator": "grpo", "scale_rewards": "batch"},
])
def test_options_run_a_step(tmp_path, overrides):
    metrics = make(tmp_path, **overrides).train_step()
    assert torch.isfinite(torch.tensor(metrics["loss/policy"]))


def test_entropy_term_is_logged_as_it_enters_the_loss(tmp_path):
    metrics = make(tmp_path, entropy_coef=0.1).train_step()
    # one on-policy window, token-mean: the term is -coef * mean entropy over the real tokens
    assert_close(
        torch.tensor(metrics["loss/entropy_bonus"]), torch.tensor(-0.1 * metrics["entropy"]), atol=1e-5, rtol=0
    )
    assert "loss/entropy" not in metrics


def test_evaluation_reports_unbiased_pass_at_k_and_any_correct(tmp_path):
    trainer = make(tmp_path, eval_samples=8, eval_max_prompts=8, eval_fraction=0.25)
    m = trainer.evaluate()
    assert {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/any_correct_of_8"} <= set(m)
    assert m["eval/pass@1"] <= m["eval/pass@2"] <= m["eval/pass@4"] <= m["eval/any_correct_of_8"]


def test_eval_tags_are_not_doubled():
    assert _tag("eval/accuracy", "eval") == "eval/accuracy"
    assert _tag("return_mean", "eval") == "eval/return_mean"
    assert _tag("reward/mean", "train") == "reward/mean"


def test_config_refusals():
    with pytest.raises(ConfigError, match="dynamic_filtering.*samples_per_prompt=1"):
        LMConfig.from_dict({"dynamic_filtering": True, "samples_per_prompt": 1})
    with pytest.raises(ConfigError, match="k3\\+ differs from k3 only in its gradient"):
        LMConfig.from_dict({"kl_estimator": "k3+", "kl_placement": "reward"})
    with pytest.raises(ConfigError, match="scale_rewards=batch applies to estimator grpo only"):
        LMConfig.from_dict({"scale_rewards": "batch", "estimator": "rloo"})
    with pytest.raises(ConfigError, match="kl_placement=none"):
        LMConfig.from_dict({"ref_update_every": 5, "kl_placement": "none"})
