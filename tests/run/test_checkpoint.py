"""A damaged latest checkpoint falls back to the previous complete one, with a warning."""

from __future__ import annotations

import pytest

from reinforcepp.gym import GymConfig, train
from reinforcepp.run import CheckpointManager, read_metrics


def _save(manager: CheckpointManager, step: int) -> None:
    with manager.save(step) as d:
        (d / "weights.bin").write_bytes(bytes(range(256)) * 4)
        (d / "sub").mkdir()
        (d / "sub" / "state.json").write_text('{"step": %d}' % step)


def test_latest_intact_skips_damaged_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        _save(manager, step)
    assert manager.latest_intact() == manager.path(3)
    blob = bytearray((manager.path(3) / "weights.bin").read_bytes())
    blob[100] ^= 0xFF  # one flipped byte
    (manager.path(3) / "weights.bin").write_bytes(bytes(blob))
    (manager.path(2) / "sub" / "state.json").write_text('{"st')  # cut short
    with pytest.warns(UserWarning) as caught:
        assert manager.latest_intact() == manager.path(1)
    messages = [str(w.message) for w in caught]
    assert any("step_00000003" in m and "weights.bin differs" in m for m in messages)
    assert any("step_00000002" in m and "sub/state.json has 4 bytes" in m for m in messages)
    (manager.path(1) / "COMPLETE").write_text("ok\n")  # written by an older version: no manifest, taken as is
    with pytest.warns(UserWarning):
        assert manager.latest_intact() == manager.path(1)


def test_gym_resume_and_eval_fall_back_from_a_damaged_checkpoint(tmp_path, capsys):
    from reinforcepp.cli import main

    common = dict(env_id="CartPole-v1", num_envs=2, steps_per_env=16, eval_every=0, eval_episodes=1, progress=False,
                  tensorboard=False, output_dir=str(tmp_path), keep_last=3)
    train(GymConfig(**common, total_env_steps=96, save_every=32))
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert [p.name for p in manager.complete()] == ["step_00000032", "step_00000064", "step_00000096"]
    (manager.path(96) / "state.safetensors").write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match="step_00000096 is damaged"):
        assert main(["gym", "--eval", str(tmp_path), "--episodes", "1"]) == 0
    assert "step_00000064" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="falling back"):
        train(GymConfig(**common, total_env_steps=128, save_every=32, resume=True))
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == [32, 64, 96, 128]
