"""REINFORCE++ at the cost of its math: old log-probs from the update's own forward, no
reference forward when beta = 0, and the bookkeeping that reports the work (phase times, FLOPs).

Every fast path is checked against the path it replaces: same weights, same metrics."""

import torch

from reinforcepp.lm.batch import collate
from reinforcepp.lm.fused import fuse_old_logprobs
from reinforcepp.lm.models import frozen_copy
from reinforcepp.lm.profile import update_tokens
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run.rng import set_seed
from reinforcepp.run.timer import PhaseTimer
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy


def _trainer(tmp_path, **overrides) -> Trainer:
    tok, model = tiny_policy()
    return Trainer(small_config(tmp_path, **overrides), model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
                   train_dataset=reverse_dataset(64))


def _count_policy_forwards(trainer: Trainer) -> list[bool]:
    """Records ``torch.is_grad_enabled()`` at each forward of the policy."""
    calls: list[bool] = []
    trainer.policy.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls


def _steps(trainer: Trainer, n: int) -> tuple[list[dict], list[int]]:
    """``n`` steps; the metrics and the number of policy forwards of each step's experience and
    update (generation excluded)."""
    calls = _count_policy_forwards(trainer)
    set_seed(trainer.config.seed)  # trainers built one after the other share the global RNG
    metrics, forwards = [], []
    for _ in range(n):
        trainer.step += 1
        rollout = trainer.rollout()
        calls.clear()
        exp = trainer.make_experience(rollout)
        m = {**trainer.update(exp), **trainer.rollout_metrics(rollout, exp)}
        forwards.append(len(calls))
        metrics.append(m)
    return metrics, forwards


def _assert_same_run(a: Trainer, b: Trainer, ma: list[dict], mb: list[dict]) -> None:
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-7, rtol=1e-6)
    for x, y in zip(ma, mb):
        for key in ("reward/mean", "kl/mean_token", "advantage/mean_token", "advantage/std_token", "loss/policy",
                    "grad_norm", "entropy"):
            assert abs(x[key] - y[key]) <= 1e-6 * max(1.0, abs(y[key])), (key, x[key], y[key])
        assert x["approx_kl"] == 0 and x["clip/frac_low"] == 0 and x["clip/frac_high"] == 0


def test_fused_old_logprobs_equal_the_separate_pass_with_one_forward_less(tmp_path):
    # reinforce_pp, KL k1 in the reward, one epoch of one mini-batch that is one micro-batch:
    # auto fuses. Same weights and metrics as the separate no-gradient pass, after 3 steps
    # (the policy leaves the reference after step 1, so the KL reward is not zero).
    fused = _trainer(tmp_path / "fused", micro_batch_size=16, kl_coef=0.5)
    separate = _trainer(tmp_path / "separate", micro_batch_size=16, kl_coef=0.5, fuse_old_logprobs=False)
    assert fused.maker.fuse_old and not separate.maker.fuse_old
    mf, ff = _steps(fused, 3)
    ms, fs = _steps(separate, 3)
    _assert_same_run(fused, separate, mf, ms)
    assert mf[-1]["kl/mean_token"] != 0
    # share_prompt: a forward is two model calls (prompts, then responses on their cache).
    # Separate: old (no grad) + reference (another model) + update = 4 policy calls; fused: 2, with gradient.
    assert fs == [4, 4, 4] and ff == [2, 2, 2]


def test_fused_over_several_micro_batches_equals_the_separate_pass(tmp_path):
    fused = _trainer(tmp_path / "fused", micro_batch_size=4, kl_coef=0.5, fuse_old_logprobs=True, share_prompt=False)
    separate = _trainer(
        tmp_path / "separate", micro_batch_size=4, kl_coef=0.5, fuse_old_logprobs=False, share_prompt=False
    )
    mf, ff = _steps(fused, 2)
    ms, fs = _steps(separate, 2)
    _assert_same_run(fused, separate, mf, ms)
    assert ff == [4, 4] and fs == [8, 8]  # 4 micro-batches


def test_fusion_only_where_the_math_allows_it():
    # auto: only when the rollout is one micro-batch; never off-policy (several epochs or
    # mini-batches: the later passes need the rollout's log-probs) or without a KL reward.
    assert fuse_old_logprobs(None, True, True, rollout_size=16, micro_batch_size=16)
    assert not fuse_old_logprobs(None, True, True, rollout_size=32, micro_batch_size=16)
    assert fuse_old_logprobs(True, True, True, rollout_size=32, micro_batch_size=16)
    assert not fuse_old_logprobs(False, True, True, rollout_size=16, micro_batch_size=16)
    assert not fuse_old_logprobs(True, False, True, rollout_size=16, micro_batch_size=16)
    assert not fuse_old_logprobs(True, True, False, rollout_size=16, micro_batch_size=16)


def test_several_epochs_keep_the_separate_pass(tmp_path):
    trainer = _trainer(tmp_path, micro_batch_size=16, epochs=2, fuse_old_logprobs=True)
    assert not trainer.maker.fuse_old
    _, forwards = _steps(trainer, 1)
    assert forwards == [2 + 2 * 2]  # old (no grad) + 2 epochs of updates


def test_zero_kl_coef_skips_the_reference_and_changes_nothing(tmp_path):
    # beta = 0: the KL term is 0 * KL. No reference model is loaded and no reference forward runs;
    # the run equals today's path, which computed the reference log-probs and multiplied them by 0.
    skipped = _trainer(tmp_path / "skip", kl_coef=0.0, kl_placement="reward", micro_batch_size=16)
    assert skipped.ref_model is None and skipped.kl_placement == "none"
    today = _trainer(
        tmp_path / "today", kl_coef=0.0, kl_placement="reward", micro_batch_size=16, fuse_old_logprobs=False
    )
    today.maker.kl_placement, today.models.reference = "reward", frozen_copy(today.policy)  # the previous behaviour
    ms, fs = _steps(skipped, 2)
    mt, ft = _steps(today, 2)
    for pa, pb in zip(skipped.policy.parameters(), today.policy.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-7, rtol=1e-6)
    for x, y in zip(ms, mt):
        assert abs(x["advantage/std_token"] - y["advantage/std_token"]) < 1e-6
        assert abs(x["loss/policy"] - y["loss/policy"]) < 1e-6
    assert fs == [2, 2] and ft == [4, 4]  # the skipped run does one policy forward (the update), today's two
    # kl_placement=loss with beta = 0: the same, no reference.
    assert _trainer(tmp_path / "loss", kl_coef=0.0, kl_placement="loss", estimator="grpo").ref_model is None


def test_phase_timer_counts_nested_phases_once():
    clock = iter([0.0, 1.0, 3.0, 6.0, 8.0, 10.0]).__next__
    timer = PhaseTimer(clock)
    # forward 0 .. 10, of which 1 .. 8 is the update, with a nested score 3 .. 6
    with timer("forward"), timer("update"), timer("score"):
        pass
    assert timer.pop() == {"time/forward": 3.0, "time/update": 4.0, "time/score": 3.0}


def test_update_tokens_count_a_shared_prompt_once():
    # 2 prompts x 2 samples: prompt lengths 3 and 2 (left-padded to 3), responses of 2, 1, 2, 2 tokens.
    b = collate([[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]], [[1, 2], [3], [1, 1], [2, 2]], pad_token_id=0)
    assert update_tokens(b, micro_batch_size=4, share_prompt=False) == 7 + 3 + 3 + 2 + 2
    assert update_tokens(b, micro_batch_size=4, share_prompt=True) == 7 + 3 + 2
    # a prompt is shared within a micro-batch only
    assert update_tokens(b, micro_batch_size=1, share_prompt=True) == 7 + 3 + 3 + 2 + 2
