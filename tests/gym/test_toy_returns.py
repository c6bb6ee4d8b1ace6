"""Hand-computed returns and advantages on the toy environment (tests/gym/gym_toy_env.py), through
the trainer's own path: Collector -> RolloutBatch -> core compute_advantages.

One environment, 10 steps per rollout, gamma = 0.5. The first rollout sees
episode 0 (rewards 1 2 3 4, truncated by the time limit), episode 1 (1 2 3, terminated) and the
first 3 steps of episode 2 (1 2 3, cut by the end of the rollout).
"""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from reinforcepp.gym import GymConfig, GymTrainer

from gym_toy_env import TOY_ID


def make_trainer(tmp_path, **kw) -> GymTrainer:
    cfg = GymConfig(env_id=TOY_ID, num_envs=1, steps_per_env=10, gamma=0.5, output_dir=str(tmp_path), progress=False,
                    tensorboard=False, **kw)
    trainer = GymTrainer(cfg)
    trainer.collector.reset(0)
    return trainer


def whiten(xs: list[float]) -> list[float]:
    mu, var = statistics.fmean(xs), statistics.pvariance(xs)
    return [(x - mu) / var**0.5 for x in xs]


def rows(t: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [t[i][mask[i].bool()].tolist() for i in range(t.shape[0])]


def test_reinforce_pp_time_limit_terminal_and_carry(tmp_path):
    tr = make_trainer(tmp_path)  # estimator reinforce_pp, time_limit terminal
    batch = tr.collector.collect(0)
    assert [s.end for s in batch.segments] == ["truncated", "terminated"]
    assert batch.last_values is None and batch.values_pad is None  # critic-free: every row terminal
    assert rows(batch.step_rewards, batch.response_mask) == [[1, 2, 3, 4], [1, 2, 3]]
    assert batch.episodes == [(10.0, 4, True), (6.0, 3, False)]
    # the unfinished episode 2 (3 steps) waits for the next rollout
    assert len(tr.collector.pending[0]["rewards"]) == 3
    carried_logprobs = tr.collector.pending[0]["logprobs"].copy()

    adv, ret = tr.make_experience(batch)
    # G_t = r_t + 0.5 G_{t+1}; the truncated episode is treated as terminal (no bootstrap)
    g = [3.25, 4.5, 5.0, 4.0, 2.75, 3.5, 3.0]
    assert ret.tolist() == pytest.approx(g, abs=1e-6)
    assert adv.tolist() == pytest.approx(whiten(g), abs=1e-5)  # global whitening over all 7 steps

    batch2 = tr.collector.collect(1)
    # the carried episode 2 ends with its 4th step in rollout 2; then episode 3 (terminated) and
    # episode 4 (truncated); 2 steps of episode 5 are carried on
    assert [s.end for s in batch2.segments] == ["truncated", "terminated", "truncated"]
    assert rows(batch2.step_rewards, batch2.response_mask) == [[1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4]]
    assert batch2.staleness.tolist() == [1, 1, 1] + [0] * 8
    # old_logprobs of the policy that acted
    assert batch2.logprobs[:3].tolist() == pytest.approx(carried_logprobs.tolist())
    assert len(tr.collector.pending[0]["rewards"]) == 2
    adv2, ret2 = tr.make_experience(batch2)
    g2 = [3.25, 4.5, 5.0, 4.0, 2.75, 3.5, 3.0, 3.25, 4.5, 5.0, 4.0]
    assert ret2.tolist() == pytest.approx(g2, abs=1e-6)
    assert adv2.tolist() == pytest.approx(whiten(g2), abs=1e-5)


def test_reinforce_pp_time_limit_drop(tmp_path):
    tr = make_trainer(tmp_path, time_limit="drop")
    batch = tr.collector.collect(0)
    assert [s.end for s in batch.segments] == ["terminated"]  # the truncated episode 0 is dropped
    assert batch.episodes == [(10.0, 4, True), (6.0, 3, False)]  # but still counted in the episode stats
    adv, ret = tr.make_experience(batch)
    assert ret.tolist() == pytest.approx([2.75, 3.5, 3.0], abs=1e-6)
    assert adv.tolist() == pytest.approx(whiten([2.75, 3.5, 3.0]), abs=1e-5)
    assert batch.num_steps == 3 and batch.obs[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_plain_reinforce_is_unwhitened_returns(tmp_path):
    tr = make_trainer(tmp_path, estimator="reinforce")
    adv, ret = tr.make_experience(tr.collector.collect(0))
    assert adv.tolist() == pytest.approx([3.25, 4.5, 5.0, 4.0, 2.75, 3.5, 3.0], abs=1e-6)


class LinearValue(nn.Module):
    """V(s) = 10 + t for the toy observation [t]."""

    def forward(self, obs):
        return 10.0 + obs[:, 0]


def test_gae_bootstraps_truncation_and_rollout_cut(tmp_path):
    tr = make_trainer(tmp_path, estimator="gae", lam=1.0)
    tr.critic = tr.collector.critic = LinearValue()
    batch = tr.collector.collect(0)
    assert [s.end for s in batch.segments] == ["truncated", "terminated", "cut"]
    # truncated: V(final obs [4]) = 14; terminated: 0; cut: V(next obs [3]) = 13
    assert batch.last_values.tolist() == [14.0, 0.0, 13.0]
    assert rows(batch.values_pad, batch.response_mask) == [[10, 11, 12, 13], [10, 11, 12], [10, 11, 12]]
    adv, ret = tr.make_experience(batch)
    # lambda = 1: A_t = G_t - V_t with G the bootstrapped discounted return (gamma 0.5)
    g = [4.125, 6.25, 8.5, 11.0, 2.75, 3.5, 3.0, 4.375, 6.75, 9.5]
    v = [10, 11, 12, 13, 10, 11, 12, 10, 11, 12]
    assert ret.tolist() == pytest.approx(g, abs=1e-5)  # value targets A + V, before whitening
    assert adv.tolist() == pytest.approx(whiten([a - b for a, b in zip(g, v)]), abs=1e-5)
    assert tr.collector.pending[0]["rewards"].size == 0  # nothing carried with a critic


def test_gae_lambda_zero_is_one_step_td(tmp_path):
    tr = make_trainer(tmp_path, estimator="gae", lam=0.0)
    tr.critic = tr.collector.critic = LinearValue()
    batch = tr.collector.collect(0)
    adv, _ = tr.make_experience(batch)
    # delta_t = r_t + 0.5 V_{t+1} - V_t; V after the last step: 14 (truncated), 0 (terminal), 13 (cut)
    deltas = [1 + 5.5 - 10, 2 + 6 - 11, 3 + 6.5 - 12, 4 + 7 - 13,
              1 + 5.5 - 10, 2 + 6 - 11, 3 + 0 - 12,
              1 + 5.5 - 10, 2 + 6 - 11, 3 + 6.5 - 12]
    assert adv.tolist() == pytest.approx(whiten(deltas), abs=1e-5)
