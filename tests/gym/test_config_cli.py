from __future__ import annotations

import json

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.gym import GymConfig
from reinforcepp.gym.cli import main
from reinforcepp.gym.policy import Policy, RunningMeanStd
from gymnasium import spaces


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'entropy_coef'"):
        GymConfig.load(None, ["entropy_coeff=0.01"])


def test_group_estimators_are_refused_with_a_reason():
    with pytest.raises(ConfigError, match="prompt"):
        GymConfig(estimator="grpo").validate()
    with pytest.raises(ConfigError, match="unknown advantage estimator"):
        GymConfig(estimator="nope").validate()


def test_cli_trains_and_evaluates(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["--env", "CartPole-v1", "--steps", "256", "--run-dir", run, "num_envs=2", "steps_per_env=64", "progress=false",
                 "eval_episodes=1", "tensorboard=false"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["eval/episodes"] == 1.0
    assert main(["--eval", run, "--episodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval/episodes"] == 2.0
    from reinforcepp.cli import main as cli_main

    assert cli_main(["gym", "--env", "CartPole-v1", "lr_shedule=linear"]) == 2
    assert "lr_schedule" in capsys.readouterr().err


def test_policy_logprobs_match_torch_distributions():
    obs = torch.randn(5, 3)
    box = spaces.Box(-1, 1, (3,))
    gauss = Policy(box, spaces.Box(-2, 2, (2,)), [8], init_log_std=-0.5)
    a, logp = gauss.act(obs, torch.Generator().manual_seed(0))
    mean = gauss(obs)
    ref = torch.distributions.Normal(mean, gauss.log_std.exp())
    assert torch.allclose(logp, ref.log_prob(a).sum(-1), atol=1e-5)
    lp2, ent = gauss.logprobs_entropy(obs, a)
    assert torch.allclose(lp2, logp, atol=1e-6) and torch.allclose(ent, ref.entropy().sum(-1), atol=1e-5)
    cat = Policy(box, spaces.Discrete(4), [8])
    a, logp = cat.act(obs, torch.Generator().manual_seed(0))
    ref = torch.distributions.Categorical(logits=cat(obs))
    lp2, ent = cat.logprobs_entropy(obs, a)
    assert torch.allclose(logp, ref.log_prob(a), atol=1e-6) and torch.allclose(lp2, logp) and torch.allclose(ent, ref.entropy(), atol=1e-5)
    assert torch.equal(cat.act(obs, deterministic=True)[0], cat(obs).argmax(-1))


def test_running_mean_std_equals_whole_batch():
    x = torch.randn(100, 3, dtype=torch.float64).numpy()
    rms = RunningMeanStd((3,))
    for chunk in (x[:10], x[10:55], x[55:]):
        rms.update(chunk)
    assert rms.mean == pytest.approx(x.mean(0), abs=1e-5) and rms.var == pytest.approx(x.var(0), abs=1e-4)
