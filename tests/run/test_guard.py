"""The guards of both trainers: the non-finite guard names the value that was not finite; the
divergence guard stops a run whose weights grow without bound while staying finite, before the
next checkpoint, with one line (exit 1)."""

from __future__ import annotations

import math

import pytest
import torch

from reinforcepp.cli import main
from reinforcepp.errors import DivergenceError, NonFiniteError
from reinforcepp.run import CheckpointManager, DivergenceGuard, NonFiniteGuard, read_metrics
from reinforcepp.run.guard import weight_norm


def test_nonfinite_message_names_the_value_that_was_not_finite():
    guard = NonFiniteGuard(2, hint="Lower lr.")
    assert guard.check(2.2e-08, float("nan"), where="step 1") is False
    with pytest.raises(NonFiniteError) as err:
        guard.check(2.2e-08, float("nan"), where="step 2")
    expected = "step 2: 2 optimizer steps in a row were not finite (this one: gradient norm nan; loss 2.2e-08)"
    assert expected in str(err.value)
    guard = NonFiniteGuard(1, hint="")
    with pytest.raises(NonFiniteError, match=r"this one: loss inf and gradient norm nan\)"):
        guard.check(float("inf"), float("nan"), where="step 3")


def test_weight_norm_and_the_divergence_bound():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [4.0]])
    assert weight_norm([a, b]) == 5.0  # sqrt(9 + 16)
    guard = DivergenceGuard(10.0, [a, b], hint="Lower lr.")
    assert guard.start == 5.0
    a.mul_(10)  # [30, 0], [0, 4]: sqrt(916) = 30.27 <= 50
    assert guard.check([a, b], where="step 1") == pytest.approx(math.sqrt(916), rel=1e-6)
    b.mul_(20)  # [30, 0], [0, 80]: sqrt(7300) = 85.4 > 10 x 5
    grew = r"step 2: training diverged: the policy's weight norm grew from 5 to 85.44 \(x17.1 > max_weight_growth=10\)"
    with pytest.raises(DivergenceError, match=grew):
        guard.check([a, b], where="step 2")
    b.fill_(3e38)  # the square overflows float32
    with pytest.raises(DivergenceError, match="beyond float32's range"):
        guard.check([a, b], where="step 3")
    assert DivergenceGuard(None, [a], hint="").check([b], where="x") == math.inf  # off: measured, never raised


GYM = ["--env", "CartPole-v1", "num_envs=2", "steps_per_env=16", "eval_every=0", "eval_episodes=1", "progress=false",
       "tensorboard=false"]


def test_gym_divergence_stops_the_run_and_keeps_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "g"
    assert main(["gym", *GYM, "--output-dir", str(run), "total_env_steps=32", "save_every=32"]) == 0
    norm = [r["policy/weight_norm"] for r in read_metrics(run) if r["kind"] == "train"]
    assert len(norm) == 1 and 5 < norm[0] < 50
    capsys.readouterr()
    # lr=1e30: every loss and gradient stays finite, the weights reach 1e30 (the CartPole run exited 0)
    assert main(["gym", "--output-dir", str(run), "--resume", "total_env_steps=128", "lr=1e30"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("reinforcepp gym: env step 64: training diverged: the policy's weight norm grew from"), line
    assert "Lower lr" in line
    assert CheckpointManager(run).latest() == run / "checkpoints" / "step_00000032"  # the weights before, intact
    assert main(["gym", "--output-dir", str(run), "--resume", "total_env_steps=64", "lr=3e-4", "progress=false"]) == 0


def test_lm_divergence_and_the_bound_is_kept_on_resume(tmp_path, capsys):
    from reinforcepp.run.state import load_state

    fast = ["sft_steps=0", "prompts_per_step=2", "samples_per_prompt=2", "micro_batch_size=4", "max_new_tokens=4",
            "eval_every=0", "tensorboard=false", "progress=false", "log_samples_every=0"]
    out = tmp_path / "r"
    assert main(["train", f"output_dir={out}", *fast, "total_steps=2", "save_every=1", "lr=1e-2"]) == 0
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    state = load_state(out / "checkpoints" / "step_00000002", "trainer_state")
    first = load_state(out / "checkpoints" / "step_00000001", "trainer_state")
    assert state["weight_norm_start"] == first["weight_norm_start"] > 0  # the start of the run, not of the checkpoint
    assert all(abs(r["policy/weight_norm"] / state["weight_norm_start"] - 1) < 0.1 for r in rows)
    capsys.readouterr()
    # lr given on resume applies (the scheduler state held the saved one), and diverges at once
    assert main(["train", "--resume", f"output_dir={out}", "total_steps=4", "lr=1e30"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("reinforcepp train: step 3: training diverged"), line
    assert CheckpointManager(out).latest() == out / "checkpoints" / "step_00000002"
