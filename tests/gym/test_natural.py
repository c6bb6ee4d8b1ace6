"""trust_region=natural in the Gymnasium trainer: one TRPO step per rollout that stays inside the
KL radius and improves the surrogate (discrete and continuous actions), the critic trained by
Adam alone, learning on CartPole, and the validation messages."""

from __future__ import annotations

import copy

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.core import categorical_kl, diagonal_gaussian_kl
from reinforcepp.gym import GymConfig, GymTrainer, train
from reinforcepp.run import read_metrics


def _one_rollout(tmp_path, **kw):
    cfg = GymConfig(trust_region="natural", output_dir=str(tmp_path), progress=False, tensorboard=False, **kw)
    trainer = GymTrainer(cfg)
    trainer.collector.reset(cfg.seed)
    batch = trainer.collector.collect(0)
    advantages, returns = trainer.make_experience(batch)
    return trainer, batch, advantages, returns


def _surrogate(policy, batch, advantages):
    with torch.no_grad():
        logprobs, _ = policy.logprobs_entropy(batch.obs, batch.actions)
        return float(-(torch.exp(logprobs - batch.logprobs) * advantages).mean())


@pytest.mark.parametrize("max_kl", [0.01, 1e-4])
def test_natural_step_on_cartpole_stays_in_the_kl_radius_and_improves(tmp_path, max_kl):
    trainer, batch, adv, ret = _one_rollout(tmp_path, env_id="CartPole-v1", num_envs=4, steps_per_env=96,
                                            max_kl=max_kl)
    assert batch.num_steps > 200
    old = copy.deepcopy(trainer.policy)
    before = _surrogate(old, batch, adv)
    metrics = trainer.natural_update(batch, adv, ret)
    with torch.no_grad():
        kl = float(categorical_kl(old(batch.obs), trainer.policy(batch.obs)).mean())
    after = _surrogate(trainer.policy, batch, adv)
    assert 0 < kl <= max_kl
    assert after < before
    assert metrics["natural/accepted_fraction"] > 0
    assert metrics["natural/step_kl"] == pytest.approx(kl, abs=1e-7)
    assert metrics["natural/improvement"] == pytest.approx(before - after, abs=1e-6)
    assert metrics["loss/policy"] == pytest.approx(before, abs=1e-6)
    trainer.close()


def test_natural_step_with_a_gaussian_policy_and_a_critic(tmp_path):
    trainer, batch, adv, ret = _one_rollout(tmp_path, env_id="Pendulum-v1", estimator="gae", num_envs=2,
                                            steps_per_env=128, epochs=2, mini_batch_size=64)
    old_policy, old_critic = copy.deepcopy(trainer.policy), copy.deepcopy(trainer.critic)
    before = _surrogate(old_policy, batch, adv)
    metrics = trainer.natural_update(batch, adv, ret)
    with torch.no_grad():
        new_mean, old_mean = trainer.policy(batch.obs), old_policy(batch.obs)
        kl = float(diagonal_gaussian_kl(old_mean, old_policy.log_std, new_mean, trainer.policy.log_std).mean())
    assert 0 < kl <= trainer.cfg.max_kl and _surrogate(trainer.policy, batch, adv) < before
    assert "loss/value" in metrics and "policy/std_mean" in metrics
    # the critic moved under Adam; the policy's parameters never got a .grad, so Adam did not touch them
    assert any(not torch.equal(a, b) for a, b in zip(old_critic.parameters(), trainer.critic.parameters()))
    assert all(p.grad is None for p in trainer.policy.parameters())
    trainer.close()


def test_natural_cartpole_learns_and_logs_its_metrics(tmp_path):
    cfg = GymConfig(env_id="CartPole-v1", trust_region="natural", total_env_steps=16_384, eval_every=0, eval_episodes=5,
                    seed=0, output_dir=str(tmp_path), progress=False, tensorboard=False)
    final = train(cfg)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train" and "natural/step_kl" in r]
    assert rows and all(0 <= r["natural/step_kl"] <= cfg.max_kl for r in rows)
    assert all(r["natural/improvement"] >= 0 and 0 <= r["natural/accepted_fraction"] <= 1 for r in rows)
    assert final["eval/return_mean"] > 5 * 22.0  # a random policy scores about 22


@pytest.mark.parametrize("override, message", [
    ({"max_kl": 0.0}, "max_kl must be > 0, got 0.0"),
    ({"max_kl": -0.01}, "max_kl must be > 0, got -0.01"),
    ({"cg_iters": 0}, "cg_iters must be >= 1, got 0"),
    ({"cg_damping": -0.1}, "cg_damping must be >= 0, got -0.1"),
    ({"line_search_steps": 0}, "line_search_steps must be >= 1, got 0"),
    ({"line_search_shrink": 1.0}, r"line_search_shrink must lie in \(0, 1\), got 1.0"),
    ({"trust_region": "natural", "entropy_coef": 0.01}, "entropy_coef=0.01: trust_region=natural"),
    ({"trust_region": "natural", "dual_clip": 3.0}, "dual_clip=3.0 is an option of trust_region=clip"),
    ({"trust_region": "natural", "torch_compile": True}, "torch_compile=true compiles the clipped loss"),
])
def test_natural_settings_are_validated_with_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        GymConfig(**override).validate()


def test_clip_only_options_stay_valid_with_clip():
    GymConfig(entropy_coef=0.01, dual_clip=3.0).validate()
    GymConfig(trust_region="natural", estimator="gae", epochs=10, mini_batch_size=64).validate()  # the critic's
    with pytest.raises(ConfigError, match="trust_region='newton' is not one of 'clip', 'natural'"):
        GymConfig.load(None, ["trust_region=newton"])


def test_natural_resume_is_exact(tmp_path):
    from reinforcepp.run import CheckpointManager
    from reinforcepp.run.state import load_state

    common = dict(env_id="CartPole-v1", estimator="gae", trust_region="natural", num_envs=2, steps_per_env=64,
                  eval_every=0, eval_episodes=1, progress=False, tensorboard=False, normalize_obs=True)
    train(GymConfig(**common, total_env_steps=512, save_every=256, output_dir=str(tmp_path / "full")))
    train(GymConfig(**common, total_env_steps=256, output_dir=str(tmp_path / "part")))
    train(GymConfig(**common, total_env_steps=512, output_dir=str(tmp_path / "part"), resume=True))
    full, part = (load_state(CheckpointManager(tmp_path / d).latest(), "state") for d in ("full", "part"))
    for net in ("policy", "critic"):
        assert all(torch.equal(full[net][k], part[net][k]) for k in full[net])
