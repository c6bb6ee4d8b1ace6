"""Nothing a user receives can run code: a pickle payload planted in any checkpoint file (or
beside them, under the names older versions used) never runs on LM resume, gym resume or
gym --eval. The payload creates a marker file when unpickled; the marker must stay absent."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from reinforcepp.gym import GymConfig, train
from reinforcepp.cli import main as cli_main
from reinforcepp.run import CheckpointManager
from reinforcepp.run.state import CheckpointFormatError, load_state, save_state


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": Payload(marker)}))


def planted_copies(run: Path, tmp: Path, marker: Path):
    """One copy of ``run`` per checkpoint file, that file replaced by the payload; plus copies
    where pickle files named as older versions wrote them sit beside the safe files."""
    latest = CheckpointManager(run).latest()
    assert latest is not None
    files = sorted(p.relative_to(run) for p in latest.rglob("*") if p.is_file())
    assert len(files) >= 3
    extra = [latest.relative_to(run) / name for name in ("trainer_state.pt", "state.pt", "model/pytorch_model.bin")]
    for i, rel in enumerate(files + extra):
        copy = tmp / f"copy{i}"
        shutil.copytree(run, copy)
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        plant(copy / rel, marker)
        yield rel, copy


def test_state_round_trip_and_old_format_refused(tmp_path):
    import numpy as np
    import torch

    state = {"step": 3, "t": torch.arange(4.0), "a": np.arange(3, dtype=np.uint32), "tup": (1, (2.5, "x")),
             "keys": {0: 1, 1: None}, "nan": float("nan")}
    save_state(tmp_path, "s", state)
    back = load_state(tmp_path, "s")
    assert back["step"] == 3 and torch.equal(back["t"], state["t"])
    assert back["a"].dtype == np.uint32 and back["tup"] == (1, (2.5, "x"))
    assert back["keys"] == {0: 1, 1: None} and back["nan"] != back["nan"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "trainer_state.pt").write_bytes(b"x")
    with pytest.raises(CheckpointFormatError, match="pickle checkpoint"):
        load_state(old, "trainer_state")


def test_planted_pickle_never_runs_on_lm_resume(tmp_path):
    from reinforcepp.lm.trainer import Trainer
    from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy

    tok, model = tiny_policy()
    # ref_update_every: the checkpoint also holds the refreshed reference model
    Trainer(small_config(tmp_path / "base", total_steps=1, ref_update_every=1), model=model, tokenizer=tok,
            reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16)).train()
    marker = tmp_path / "PWNED"
    tried = 0
    for rel, copy in planted_copies(tmp_path / "base" / "run", tmp_path, marker):
        cfg = small_config(tmp_path, output_dir=str(copy), total_steps=1, resume=True, ref_update_every=1)
        try:
            Trainer(cfg, reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
        except Exception:  # noqa: BLE001 -- refusing is fine; running the payload is not
            pass
        tried += 1
        assert not marker.exists(), f"payload in {rel} ran"
    assert tried >= 12


def _gym_cfg(run: Path, **kw) -> GymConfig:
    base = dict(env_id="CartPole-v1", num_envs=2, steps_per_env=16, total_env_steps=32, eval_every=0, eval_episodes=1,
                progress=False, tensorboard=False, output_dir=str(run))
    return GymConfig(**{**base, **kw})


def test_planted_pickle_never_runs_on_gym_resume_or_eval(tmp_path, capsys):
    base = tmp_path / "base"
    train(_gym_cfg(base))
    marker = tmp_path / "PWNED"
    for rel, copy in planted_copies(base, tmp_path, marker):
        try:
            train(_gym_cfg(copy, resume=True, total_env_steps=64))
        except Exception:  # noqa: BLE001
            pass
        assert not marker.exists(), f"payload in {rel} ran on resume"
        assert cli_main(["gym", "--eval", str(copy), "--episodes", "1"]) in (0, 2)
        assert not marker.exists(), f"payload in {rel} ran on --eval"


def test_the_package_never_unpickles():
    import re

    import reinforcepp

    root = Path(reinforcepp.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
