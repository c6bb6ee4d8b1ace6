"""The loss variants and on-policy distillation in the language-model trainer (issue 24, item 4),
and trust_region=natural there (item 1)."""

from __future__ import annotations

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.lm.config import LMConfig
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy


def _trainer(path, **overrides):
    tok, model = tiny_policy()
    return Trainer(small_config(path, **overrides), model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
                   train_dataset=reverse_dataset(64))


def _rows(t):
    return [r for r in read_metrics(t.run_dir) if r.get("kind") == "train"]


@pytest.mark.parametrize("loss", ["cispo", "clip_cov", "kl_cov"])
def test_each_policy_loss_trains_and_reaches_the_loss(tmp_path, loss):
    """One optimizer step on a rollout: the gradient equals the one of the core's loss computed
    by hand on the same experience (the trainer adds nothing)."""
    from reinforcepp.core import PolicyLossParams, aggregate, compute_policy_loss

    t = _trainer(tmp_path, policy_loss=loss, total_steps=1, epochs=2, mini_batch_size=16)
    exp = t.make_experience(t.rollout())
    b = exp.batch
    out = t.updater.forward(b)
    torch.manual_seed(5)
    old_logprobs = exp.old_logprobs if exp.old_logprobs is not None else out.logprobs.detach()
    pl = compute_policy_loss(loss, out.logprobs, old_logprobs, exp.advantages, b.response_mask, t.updater.loss_params)
    expected = aggregate(pl.loss, b.response_mask, "token-mean")
    from collections import defaultdict

    torch.manual_seed(5)  # clip_cov draws its tokens from the global generator
    got = t.updater.micro_loss(exp, float(b.response_mask.sum()), float(len(exp)), defaultdict(list), defaultdict(list))
    assert float(got.detach()) == pytest.approx(float(expected.detach()), abs=1e-6)
    assert isinstance(t.updater.loss_params, PolicyLossParams)


def test_loss_options_are_refused_under_another_loss():
    with pytest.raises(ConfigError,
                       match="cispo_eps_high is set but policy_loss=ppo; it applies to policy_loss=cispo only"):
        LMConfig.from_dict({"cispo_eps_high": 2.0})
    with pytest.raises(ConfigError, match="policy_loss=cispo with dual_clip"):
        LMConfig.from_dict({"policy_loss": "cispo", "dual_clip": 3.0})
    with pytest.raises(ConfigError, match="policy_loss=kl_cov with trust_region=natural"):
        LMConfig.from_dict({"policy_loss": "kl_cov", "trust_region": "natural"})
    with pytest.raises(ConfigError, match="broadcasts one advantage per response"):
        LMConfig.from_dict({"teacher": "t", "estimator": "grpo"})


def test_distillation_moves_the_policy_towards_the_teacher(tmp_path):
    """teacher=PATH: the reward is -(logp - teacher_logp) per token; with no task reward the
    policy's reverse KL to a (peaked) teacher, summed over each response, falls."""
    tok, teacher = tiny_policy(seed=7)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    zero = lambda prompts, completions, **_: [0.0] * len(completions)  # noqa: E731
    tok, model = tiny_policy()
    t = Trainer(small_config(tmp_path / "run", teacher=str(tmp_path / "teacher"), total_steps=24, lr=3e-3, kl_coef=0.0,
                             max_new_tokens=6, prompts_per_step=16, micro_batch_size=64), model=model, tokenizer=tok,
                reward_funcs=[zero], train_dataset=reverse_dataset(64))
    t.train()
    kl = [r["distill/reverse_kl_sequence"] for r in _rows(t)]
    assert sum(kl[-5:]) / 5 < 0.92 * sum(kl[:5]) / 5, kl  # the sum over a response is what the reward optimises


def test_a_teacher_with_another_tokenizer_is_refused_before_any_model_loads(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from reinforcepp.lm.tasks import build_char_tokenizer

    other = build_char_tokenizer("xyz")
    other.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ConfigError, match="teacher=.*its tokenizer differs from the policy's"):
        _trainer(tmp_path / "run", teacher=str(tmp_path / "teacher"))
    assert AutoTokenizer and LlamaConfig and LlamaForCausalLM  # nothing of the teacher's model was needed


def test_natural_steps_stay_in_the_trust_region_and_improve(tmp_path):
    t = _trainer(tmp_path, trust_region="natural", total_steps=3, max_kl=0.005, temperature=1.3)
    t.train()
    rows = _rows(t)
    assert all(r["natural/step_kl"] <= 0.005 + 1e-9 for r in rows)
    accepted = [r for r in rows if r["natural/accepted_fraction"] > 0]
    assert accepted and all(r["natural/improvement"] > 0 for r in accepted)


def test_natural_refuses_what_it_cannot_honour():
    for values, what in (({"fsdp": True}, "fsdp=true"), ({"entropy_coef": 0.1}, "entropy_coef"),
                         ({"epochs": 2}, "epochs=2"), ({"max_kl": 0}, "max_kl must be > 0"),
                         ({"cg_iters": 0}, "cg_iters must be >= 1")):
        with pytest.raises(ConfigError, match=what):
            LMConfig.from_dict({"trust_region": "natural", **values})
