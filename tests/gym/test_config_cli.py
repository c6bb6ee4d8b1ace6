from __future__ import annotations

import json

import pytest
import torch
from gymnasium import spaces

from reinforcepp.config import ConfigError
from reinforcepp.gym import GymConfig
from reinforcepp.gym.cli import main
from reinforcepp.gym.policy import Policy, RunningMeanStd


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
    assert main(["--env", "CartPole-v1", "--steps", "256", "--output-dir", run, "num_envs=2", "steps_per_env=64",
                 "progress=false", "eval_episodes=1", "tensorboard=false"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["eval/episodes"] == 1.0
    assert main(["--eval", run, "--episodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval/episodes"] == 2.0
    from reinforcepp.cli import main as cli_main

    assert cli_main(["gym", "--env", "CartPole-v1", "lr_shedule=linear"]) == 2
    assert "lr_schedule" in capsys.readouterr().err


def test_cli_applies_the_tuned_preset_and_says_so(tmp_path, capsys):
    from reinforcepp.gym.cli import load_with_preset
    from reinforcepp.gym.presets import PRESETS

    preset = PRESETS[("CartPole-v1", "gae")]
    cfg = load_with_preset(None, ["env_id=CartPole-v1", "estimator=gae", "lr=5e-4"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("reinforcepp gym: CartPole-v1 / gae: tuned preset applied") and "yours kept: lr" in first
    assert cfg.normalize_reward is True and cfg.num_envs == preset["num_envs"] and cfg.lr_schedule == "linear"
    assert cfg.lr == 5e-4  # key=value wins over the preset
    # a YAML file wins over the preset too
    (tmp_path / "c.yaml").write_text("estimator: gae\nnormalize_reward: false\n")
    assert load_with_preset(str(tmp_path / "c.yaml"), []).normalize_reward is False
    plain = load_with_preset(None, ["estimator=gae"], use_preset=False)
    assert plain == GymConfig(estimator="gae") and "plain defaults (--no-preset)" in capsys.readouterr().out
    assert load_with_preset(None, ["env_id=Acrobot-v1"]) == GymConfig(env_id="Acrobot-v1")
    assert "no tuned preset" in capsys.readouterr().out
    # the CLI's first line names the preset
    run = str(tmp_path / "run")
    assert main(["--env", "CartPole-v1", "--steps", "128", "--output-dir", run, "steps_per_env=16", "progress=false",
                 "eval_episodes=1", "tensorboard=false"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("reinforcepp gym: CartPole-v1 / reinforce_pp: tuned preset applied")
    assert json.loads(out[-1])["eval/episodes"] == 1.0


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
    assert torch.allclose(logp, ref.log_prob(a), atol=1e-6) and torch.allclose(lp2, logp)
    assert torch.allclose(ent, ref.entropy(), atol=1e-5)
    assert torch.equal(cat.act(obs, deterministic=True)[0], cat(obs).argmax(-1))


def test_running_mean_std_equals_whole_batch():
    x = torch.randn(100, 3, dtype=torch.float64).numpy()
    rms = RunningMeanStd((3,))
    for chunk in (x[:10], x[10:55], x[55:]):
        rms.update(chunk)
    assert rms.mean == pytest.approx(x.mean(0), abs=1e-5) and rms.var == pytest.approx(x.var(0), abs=1e-4)
