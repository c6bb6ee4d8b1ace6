"""End-to-end: learning on CartPole, the run directory, exact resume, sync = async."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from reinforcepp.gym import GymConfig, GymTrainer, train
from reinforcepp.run.state import load_state
from reinforcepp.run import CheckpointManager, read_metrics

RANDOM_CARTPOLE = 22.0  # mean return of the uniform random policy


def test_cartpole_learns_critic_free(tmp_path):
    cfg = GymConfig(env_id="CartPole-v1", total_env_steps=16_384, lr=1e-3, eval_every=0, eval_episodes=5, seed=0,
                    output_dir=str(tmp_path / "run"), progress=False)
    final = train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    early = rows[0]["episode/return_mean"]
    late = np.mean([r["episode/return_mean"] for r in rows[-3:]])
    assert early < 2 * RANDOM_CARTPOLE
    assert late > 4 * RANDOM_CARTPOLE, f"training return {late} is not well above a random policy's"
    assert final["eval/return_mean"] > 5 * RANDOM_CARTPOLE
    # the same run directory as the language-model trainer
    for name in ("config.yaml", "metrics.jsonl", "plots.png", "tensorboard"):
        assert (tmp_path / "run" / name).exists(), name
    assert CheckpointManager(tmp_path / "run").latest() is not None
    assert GymConfig.load(tmp_path / "run" / "config.yaml") == cfg
    for key in ("loss/policy", "entropy", "clip/frac_low", "clip/frac_high", "approx_kl", "grad_norm",
                "advantage/mean_token", "advantage/mean_sample", "episode/length_mean", "time/env_steps_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert abs(rows[-1]["advantage/mean_token"]) < 1e-5  # token-weighted mean of whitened advantages


def test_cartpole_learns_with_gae(tmp_path):
    cfg = GymConfig(env_id="CartPole-v1", estimator="gae", total_env_steps=16_384, lr=1e-3, eval_every=0,
                    eval_episodes=5, seed=0, output_dir=str(tmp_path), progress=False, tensorboard=False)
    final = train(cfg)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert "loss/value" in rows[-1]
    assert np.mean([r["episode/return_mean"] for r in rows[-3:]]) > 4 * RANDOM_CARTPOLE
    assert final["eval/return_mean"] > 4 * RANDOM_CARTPOLE


def _final_weights(run_dir):
    state = load_state(CheckpointManager(run_dir).latest(), "state")
    return state["policy"], state["critic"]


@pytest.mark.parametrize("estimator", ["reinforce_pp", "gae"])
def test_resume_is_exact(tmp_path, estimator):
    common = dict(env_id="CartPole-v1", estimator=estimator, num_envs=2, steps_per_env=64, eval_every=0,
                  eval_episodes=1, progress=False, tensorboard=False, normalize_obs=True, normalize_reward=True,
                  lr=1e-3)
    full = tmp_path / "full"
    train(GymConfig(**common, total_env_steps=512, save_every=256, output_dir=str(full)))
    part = tmp_path / "part"
    train(GymConfig(**common, total_env_steps=256, output_dir=str(part)))
    # a row logged after the checkpoint (as by a crash) must be dropped on resume
    with (part / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 999, "kind": "train", "junk": 1.0}) + "\n")
    train(GymConfig(**common, total_env_steps=512, output_dir=str(part), resume=True))
    for a, b in zip(_final_weights(full), _final_weights(part)):
        if a is not None:
            assert all(torch.equal(a[k], b[k]) for k in a)

    def train_rows(d):
        rows = [r for r in read_metrics(d) if r["kind"] == "train"]
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]

    assert train_rows(full) == train_rows(part)


def test_sync_and_async_give_the_same_rollout(tmp_path):
    batches = []
    for mode in ("sync", "async"):
        tr = GymTrainer(GymConfig(env_id="CartPole-v1", num_envs=2, steps_per_env=40, vectorization=mode,
                                  output_dir=str(tmp_path), estimator="gae"))
        try:
            tr.collector.reset(3)
            batches.append(tr.collector.collect(0))
        finally:
            tr.close()
    a, b = batches
    assert torch.equal(a.obs, b.obs) and torch.equal(a.actions, b.actions)
    assert torch.equal(a.step_rewards, b.step_rewards)
    assert torch.equal(a.last_values, b.last_values)


def test_continuous_actions_pendulum(tmp_path):
    cfg = GymConfig(env_id="Pendulum-v1", num_envs=2, steps_per_env=200, total_env_steps=800, normalize_obs=True,
                    normalize_reward=True, eval_every=0, eval_episodes=1, output_dir=str(tmp_path), progress=False,
                    tensorboard=False)
    final = train(cfg)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert rows[-1]["episodes"] == 2 and rows[-1]["episode/truncated_frac"] == 1.0  # Pendulum only truncates
    assert "policy/std_mean" in rows[-1] and -2000 < final["eval/return_mean"] <= 0


def test_torch_threads_are_set(tmp_path):
    torch.set_num_threads(2)
    GymTrainer(GymConfig(output_dir=str(tmp_path), torch_threads=1)).close()
    assert torch.get_num_threads() == 1


def test_video_recording_or_clear_error(tmp_path):
    tr = GymTrainer(GymConfig(output_dir=str(tmp_path)))
    try:
        import moviepy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"reinforcepp\[render\]"):
            tr.evaluate(1, video_dir=tmp_path / "videos")
    else:
        result = tr.evaluate(1, video_dir=tmp_path / "videos")
        assert result["eval/episodes"] == 1.0
        assert list((tmp_path / "videos").glob("*.mp4"))
    finally:
        tr.close()


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tmp_path):
    from reinforcepp.errors import NonFiniteError

    trainer = GymTrainer(GymConfig(env_id="CartPole-v1", estimator="gae", num_envs=2, steps_per_env=64,
                                   total_env_steps=1024, lr=1e30, eval_every=0, progress=False, tensorboard=False,
                                   output_dir=str(tmp_path), max_nonfinite_steps=3))
    try:
        with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
            trainer.train()
        assert trainer.guard.total == 3
        assert all(bool(torch.isfinite(p).all()) for p in trainer.params)  # a NaN never reaches the weights
    finally:
        trainer.close()


def test_normalisers_never_absorb_inf_or_nan():
    from reinforcepp.gym.policy import RewardNormalizer, RunningMeanStd

    rms = RunningMeanStd((2,))
    rms.update(np.array([[1.0, 2.0], [3.0, 4.0]]))
    mean, var, count = rms.mean.copy(), rms.var.copy(), rms.count
    rms.update(np.array([[np.inf, 0.0], [np.nan, 1.0]]))
    assert np.array_equal(rms.mean, mean) and np.array_equal(rms.var, var) and rms.count == count and rms.rejected == 2
    rms.update(np.array([[5.0, 6.0], [np.inf, 1.0]]))  # the finite row counts, the other does not
    assert rms.count == count + 1 and np.isfinite(rms.mean).all()
    norm = RewardNormalizer(2, 0.99, True, 10.0)
    norm(np.array([1.0, 2.0]), np.array([False, False]))
    out = norm(np.array([1e39, 1.0]), np.array([False, False]))
    assert np.isfinite(norm.rms.var) and np.isfinite(norm.ret).all() and np.isfinite(out[1])
