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


# --------------------------------------------- paths and state a run folder records, checked
def _resign(checkpoint: Path) -> None:
    """Rewrite a checkpoint's COMPLETE for its current files, as a forger would."""
    import json

    from reinforcepp.run.checkpoint import MARKER, manifest

    (checkpoint / MARKER).write_text(json.dumps({"files": manifest(checkpoint)}) + "\n")


def test_reference_record_is_checked_against_your_model_and_the_checkpoint(tmp_path, capsys):
    import json

    from tests.lm.helpers import tiny_policy

    model_dir, zeroed = tmp_path / "model", tmp_path / "zeroed"
    tok, model = tiny_policy()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for p in model.parameters():
        p.data.zero_()
    model.save_pretrained(zeroed)
    tok.save_pretrained(zeroed)
    run = tmp_path / "run"
    fast = ["total_steps=1", "prompts_per_step=2", "samples_per_prompt=2", "micro_batch_size=4", "max_new_tokens=4",
            "eval_every=0", "tensorboard=false", "progress=false", "log_samples_every=0", "kl_placement=reward",
            "task=sort"]
    assert cli_main(["train", f"output_dir={run}", f"model={model_dir}", *fast]) == 0
    record = json.loads((run / "reference.json").read_text())
    assert record["path"] == str(model_dir.resolve())
    resume = ["train", "--resume", f"output_dir={run}", "total_steps=2"]
    capsys.readouterr()

    def refused(*extra: str) -> str:
        assert cli_main([*resume, *extra]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "sets model=" in refused()  # the folder's model is not taken
    # the record names another model (with its true hashes): never followed
    from reinforcepp.lm.models import weights_fingerprint

    original = (run / "reference.json").read_text()
    forged = {"path": str(zeroed.resolve()), "sha256": weights_fingerprint(str(zeroed))}
    (run / "reference.json").write_text(json.dumps(forged))
    line = refused(f"model={model_dir}")
    assert "never chooses a model" in line and str(zeroed.resolve()) in line
    # fields the library never writes are not read
    (run / "reference.json").write_text(json.dumps({**record, "trust_remote_code": True}))
    assert "not a reference record" in refused(f"model={model_dir}")
    # a record replaced by another valid one is not the one the checkpoint was written with
    (run / "reference.json").write_text(json.dumps(record))  # same content, other bytes
    assert "not the reference record the checkpoint" in refused(f"model={model_dir}")
    (run / "reference.json").write_text(original)
    assert cli_main([*resume, f"model={model_dir}"]) == 0


def test_reference_copy_is_checked_against_its_record(tmp_path, capsys):
    import json

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    fast = ["total_steps=1", "prompts_per_step=2", "samples_per_prompt=2", "micro_batch_size=4", "max_new_tokens=4",
            "eval_every=0", "tensorboard=false", "progress=false", "log_samples_every=0", "kl_placement=reward",
            "sft_steps=0"]
    assert cli_main(["train", f"output_dir={run}", *fast]) == 0
    assert json.loads((run / "reference.json").read_text())["copy"] == "reference"
    weights = run / "reference" / "model.safetensors"
    zeroed = {k: v * 0 for k, v in load_file(str(weights)).items()}
    save_file(zeroed, str(weights), metadata={"format": "pt"})
    capsys.readouterr()
    assert cli_main(["train", "--resume", f"output_dir={run}", "total_steps=2"]) == 2
    assert "does not hold the files recorded" in capsys.readouterr().err


def test_forged_gym_state_cannot_set_environment_settings(tmp_path, capsys):
    import json

    base = tmp_path / "base"
    train(_gym_cfg(base, save_every=32))
    latest = CheckpointManager(base).latest()
    assert latest is not None
    good = (latest / "state.json").read_text()
    doc = json.loads(good)
    links = doc["state"]["envs"][0]
    assert [link["class"] for link in links] == ["TimeLimit", "OrderEnforcing", "PassiveEnvChecker", "CartPoleEnv"]
    forgeries = [
        (0, "_max_episode_steps", 3, "TimeLimit._max_episode_steps=3"),  # episodes of 3 steps
        (3, "gravity", 0.0, "CartPoleEnv.gravity=0.0"),
        (3, "evil", 1, "CartPoleEnv.evil, which a fresh environment does not have"),
        (0, "_saved_kwargs", "x", "TimeLimit._saved_kwargs"),
    ]
    for link, key, value, expected in forgeries:
        forged = json.loads(good)
        forged["state"]["envs"][1][link]["data"][key] = value
        (latest / "state.json").write_text(json.dumps(forged))
        _resign(latest)
        capsys.readouterr()
        for argv in (["gym", "--output-dir", str(base), "--resume", "total_env_steps=64", "progress=false"],
                     ["gym", "--eval", str(base), "--episodes", "1"]):
            assert cli_main(argv) == 2, (key, argv)
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert expected in line and "state.json, environment 1" in line, line
    (latest / "state.json").write_text(good)
    _resign(latest)
    assert cli_main(["gym", "--output-dir", str(base), "--resume", "total_env_steps=64", "progress=false"]) == 0
