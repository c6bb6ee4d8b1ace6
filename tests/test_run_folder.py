"""Nothing a user does by habit destroys data: reusing a run folder, resuming, overwriting.
Security settings never come from a run folder. Driven through the command line."""

from __future__ import annotations

import json

import pytest
import yaml

from reinforcepp.cli import main
from reinforcepp.run import read_metrics

LM_FAST = ["sft_steps=0", "total_steps=1", "prompts_per_step=2", "samples_per_prompt=2", "micro_batch_size=4",
           "max_new_tokens=4", "eval_every=0", "eval_max_prompts=4", "tensorboard=false", "progress=false",
           "log_samples_every=0"]
GYM_FAST = ["--env", "CartPole-v1", "num_envs=2", "steps_per_env=16", "eval_every=0", "eval_episodes=1",
            "progress=false", "tensorboard=false"]


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "no message"
    assert "Traceback" not in err
    return lines[-1]


def test_lm_run_folder_guard_overwrite_and_resume_security(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", f"output_dir={out}", *LM_FAST]) == 0
    capsys.readouterr()
    # Reusing the folder without --resume is refused, and nothing is touched.
    before = (out / "metrics.jsonl").read_text()
    assert main(["train", f"output_dir={out}", *LM_FAST]) == 2
    msg = one_line(capsys.readouterr().err)
    assert str(out) in msg and "--resume" in msg and "--overwrite" in msg and "output_dir" in msg
    assert (out / "metrics.jsonl").read_text() == before
    # A run folder that asks for remote code: resume does not take it (and says so).
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["trust_remote_code"] = True
    marker = tmp_path / "PWNED"
    (out / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
    )
    saved["reward_funcs"] = [f"{out / 'evil.py'}:f"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    # Code named in the folder is not taken, and resuming without it is refused (it would
    # silently train on another reward): the user must give the reward again.
    assert main(["train", "--resume", f"output_dir={out}", "total_steps=2"]) == 2
    msg = one_line(capsys.readouterr().err)
    assert "reward_funcs=" in msg and "evil.py:f" in msg and "never taken from a run folder" in msg
    assert not marker.exists()
    assert main(["train", "--resume", f"output_dir={out}", "total_steps=2", "reward_funcs=[]"]) == 0
    err = capsys.readouterr().err
    assert not marker.exists()  # the reward file shipped in the folder was never imported
    assert "trust_remote_code=True in the run folder is not used" in err
    assert "reward_funcs: the run folder had" in err
    assert "total_steps: saved 1, now 2" in err
    assert yaml.safe_load((out / "config.yaml").read_text())["trust_remote_code"] is False
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2]
    # --overwrite moves the old run aside; nothing is deleted.
    assert main(["train", f"output_dir={out}", "--overwrite", *LM_FAST]) == 0  # a flag among the items
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and [r["step"] for r in read_metrics(aside[0]) if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1]


def test_gym_run_folder_guard_and_resume_uses_saved_config(tmp_path, capsys):
    run = tmp_path / "g"
    assert main(["gym", *GYM_FAST, "--output-dir", str(run), "total_env_steps=32", "lr=0.002", "save_every=32"]) == 0
    capsys.readouterr()
    assert main(["gym", *GYM_FAST, "--output-dir", str(run), "total_env_steps=32"]) == 2
    msg = one_line(capsys.readouterr().err)
    assert str(run) in msg and "--resume" in msg and "--overwrite" in msg
    # --resume with nothing to resume is refused (and creates nothing).
    empty = tmp_path / "empty"
    assert main(["gym", "--output-dir", str(empty), "--resume"]) == 2
    assert "no complete checkpoint" in one_line(capsys.readouterr().err) and not empty.exists()
    # --resume takes the run's config (lr, steps_per_env), the override on top, reported.
    assert main(["gym", "--output-dir", str(run), "--resume", "total_env_steps=64", "progress=false"]) == 0
    captured = capsys.readouterr()
    assert "total_env_steps: saved 32, now 64" in captured.err
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["lr"] == 0.002 and cfg["steps_per_env"] == 16
    assert cfg["total_env_steps"] == 64 and cfg["save_every"] == 32
    assert json.loads(captured.out.strip().splitlines()[-1])["output_dir"] == str(run)
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [32, 64]


# ------------------------------------------------------------------ resume trust, decided by key
# Every key a run folder never decides (CHOSEN_BY_YOU), with values that would run code, load a
# model or reach a server if taken: the spellings that got through the value-parsing check of
# older versions (a leading space, verl:, a colon inside the path, a slash in the function
# name, the environment key) and more.
def planted_values(tmp_path):
    evil = tmp_path / "evil.py"
    colon = tmp_path / "a:b"
    colon.mkdir(exist_ok=True)
    return {
        "reward_funcs": [[f" {evil}:f"], [f"verl:{evil}:f"], [f"verl:{evil}"], [f"{colon / 'evil.py'}:f"],
                         [f"{evil}:f/g"],
                         [f"openrlhf:{evil}"], [f"\t{evil}:f"], [f"{evil}:f "], [f"VERL:{evil}"], ["evil_module:f"],
                         [f"rm:{tmp_path / 'zeroed'}"], ["rm:org/model"], ["http://127.0.0.1:9/reward"],
                         ["https://example.org/r"],
                         ["tests.lm.helpers:fraction_of_a", f"{evil}:f"], f"{evil}:f"],
        "environment": [f"{evil}:make_env", f" {evil}:make_env", f"{colon / 'evil.py'}:make_env",
                        "evil_module:make_env"],
        "model": [str(tmp_path / "zeroed"), "org/model", "~/model", f" {tmp_path / 'zeroed'}"],
        "tokenizer": [str(tmp_path / "zeroed"), "org/tokenizer"],
        "ref_model": [str(tmp_path / "zeroed"), "http://127.0.0.1:9", "org/model"],
        "critic_model": [str(tmp_path / "zeroed")],
        "env_id": ["evil_module:Evil-v0", "Acrobot-v1", " CartPole-v0"],
        "env_kwargs": [{"max_episode_steps": 3}],
        "teacher": [str(tmp_path / "zeroed"), "org/teacher"],
        "rollout_urls": [["http://127.0.0.1:9"], ["vllm+http://example.org:8000"]],
    }


DATA_KEYS = {"output_dir", "train_data", "eval_data"}
"""Keys that name files too, which a run folder may keep: the run's own folder, the prompts it reads."""


def test_every_key_that_names_a_path_url_model_or_code_is_classified():
    import dataclasses
    import re
    import typing

    from reinforcepp.gym.config import GymConfig
    from reinforcepp.lm.config import LMConfig
    from reinforcepp.run.folder import CHOSEN_BY_YOU, PERMISSIONS

    names = re.compile(r"path|URL|module:|hub|file\.py|\bfile\b|\bmodels?\b|environment id")
    for cls in (LMConfig, GymConfig):
        for field in dataclasses.fields(cls):
            tp = cls.field_types()[field.name]
            text = tp is str or str in typing.get_args(tp) or typing.get_args(tp) == (str,)
            if text and names.search(field.metadata["help"]):
                assert field.name in {*CHOSEN_BY_YOU, *PERMISSIONS, *DATA_KEYS}, (
                    f"{cls.__name__}.{field.name} names a path, URL, model or code: add it to run/folder.py's "
                    "CHOSEN_BY_YOU (or PERMISSIONS)")


def test_every_chosen_key_is_refused_from_the_folder_and_taken_from_you(tmp_path):
    from reinforcepp.gym.config import GymConfig
    from reinforcepp.lm.config import LMConfig
    from reinforcepp.run.folder import CHOSEN_BY_YOU, RunDirError, merge_resumed_config

    lm, gym = LMConfig.defaults(), GymConfig.defaults()
    planted = planted_values(tmp_path)
    assert set(planted) == set(CHOSEN_BY_YOU)
    for key, values in planted.items():
        defaults = lm if key in lm else gym
        for value in values:
            saved = {key: value, "seed": 3}
            with pytest.raises(RunDirError, match=f"sets {key}=") as err:
                merge_resumed_config(saved, {"output_dir": "x"}, defaults)
            assert "never taken from a run folder" in str(err.value) and "\n" not in str(err.value)
            # given again: yours is used, and the folder's other settings still are
            merged, notes = merge_resumed_config(saved, {key: "mine"}, defaults)
            assert merged[key] == "mine" and merged["seed"] == 3
            assert notes == [f"{key}: the run folder had {value!r}, using yours, 'mine'"]
            merged, notes = merge_resumed_config(saved, {key: value}, defaults)
            assert merged[key] == value and notes == []
        # the default in the folder: nothing to decide, nothing taken
        merged, notes = merge_resumed_config({key: defaults.get(key)}, {}, defaults)
        assert key not in merged and notes == []
    # every refused key is named in the one line
    with pytest.raises(RunDirError) as err:
        merge_resumed_config({"model": "/m", "ref_model": "/r", "reward_funcs": ["a:b"]}, {}, lm)
    assert all(f"{k}=" in str(err.value) for k in ("model", "ref_model", "reward_funcs"))


def test_permissions_are_never_taken_from_the_folder(tmp_path):
    from reinforcepp.lm.config import LMConfig
    from reinforcepp.run.folder import PERMISSIONS, merge_resumed_config

    lm = LMConfig.defaults()
    saved = {"trust_remote_code": True, "remote_token_file": "/etc/token", "wandb_project": "theirs", "lr": 0.5}
    merged, notes = merge_resumed_config(saved, {}, lm)
    assert not any(k in merged for k in PERMISSIONS) and merged["lr"] == 0.5
    assert len(notes) == 3 and all("in the run folder is not used" in n for n in notes)
    merged, _ = merge_resumed_config(saved, {"trust_remote_code": "true"}, lm)
    assert merged["trust_remote_code"] == "true"


def _write_evil(tmp_path, marker):
    code = (f"open({str(marker)!r}, 'w').close()\n"
            "def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
            "compute_score = reward_func = f\nmake_env = f\n")
    (tmp_path / "evil.py").write_text(code)
    (tmp_path / "a:b").mkdir(exist_ok=True)
    (tmp_path / "a:b" / "evil.py").write_text(code)
    (tmp_path / "evil_module.py").write_text(code)


def test_lm_resume_never_runs_or_loads_what_the_folder_names(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", f"output_dir={out}", *LM_FAST, "reward_funcs=tests.lm.helpers:fraction_of_a"]) == 0
    marker = tmp_path / "PWNED"
    planted = planted_values(tmp_path)
    _write_evil(tmp_path, marker)
    monkeypatch.syspath_prepend(str(tmp_path))  # so that evil_module would import if named
    original = (out / "config.yaml").read_text()
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    for key in ("reward_funcs", "environment", "model", "tokenizer", "ref_model", "critic_model"):
        for value in planted[key]:
            saved = yaml.safe_load(original)
            saved[key] = value
            (out / "config.yaml").write_text(yaml.safe_dump(saved))
            again = [] if key == "reward_funcs" else ["reward_funcs=tests.lm.helpers:fraction_of_a"]
            assert main(["train", "--resume", f"output_dir={out}", "total_steps=2", *again]) == 2, (key, value)
            msg = one_line(capsys.readouterr().err)
            assert msg.startswith("reinforcepp train: resume:") and f"sets {key}=" in msg, msg
            assert not marker.exists(), (key, value)
    assert (out / "metrics.jsonl").read_text() == before  # refused before anything was touched
    # the reward the run had, given again: it resumes
    (out / "config.yaml").write_text(original)
    assert main(["train", "--resume", f"output_dir={out}", "total_steps=1"]) == 2  # not given again: refused
    assert "reward_funcs=['tests.lm.helpers:fraction_of_a']" in one_line(capsys.readouterr().err)
    assert main(["train", "--resume", f"output_dir={out}", "total_steps=2",
                 "reward_funcs=tests.lm.helpers:fraction_of_a"]) == 0
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2] and not marker.exists()


def test_gym_resume_and_eval_never_take_the_environment_from_the_folder(tmp_path, capsys, monkeypatch):
    run = tmp_path / "g"
    assert main(["gym", *GYM_FAST, "--output-dir", str(run), "total_env_steps=32"]) == 0
    marker = tmp_path / "PWNED"
    _write_evil(tmp_path, marker)
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    original = (run / "config.yaml").read_text()
    capsys.readouterr()
    planted = planted_values(tmp_path)
    for key, values in (("env_id", planted["env_id"]), ("env_kwargs", planted["env_kwargs"])):
        for value in values:
            saved = yaml.safe_load(original)
            saved[key] = value
            (run / "config.yaml").write_text(yaml.safe_dump(saved))
            resume = ["gym", "--output-dir", str(run), "--resume", "total_env_steps=64"]
            for argv in (resume, ["gym", "--eval", str(run)]):
                assert main(argv) == 2, (argv, key, value)
                msg = one_line(capsys.readouterr().err)
                assert f"sets {key}=" in msg and "never taken from a run folder" in msg, msg
                assert not marker.exists()
    (run / "config.yaml").write_text(original)
    assert main(["gym", "--output-dir", str(run), "--resume", "total_env_steps=64", "progress=false"]) == 0
    assert not marker.exists()
    # the folder's env_id is refused; given again with --env (or env_id=), yours is used
    saved = yaml.safe_load(original)
    saved["env_id"] = "Acrobot-v1"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    assert main(["gym", "--eval", str(run), "--episodes", "1"]) == 2
    assert "eval: the run folder's config.yaml sets env_id='Acrobot-v1'" in one_line(capsys.readouterr().err)
    assert main(["gym", "--eval", str(run), "--episodes", "1", "--env", "CartPole-v1"]) == 0
    assert "env_id: the run folder had 'Acrobot-v1', using yours, 'CartPole-v1'" in capsys.readouterr().err
    # env_kwargs given: taken, and then the checkpoint's environment state (its 500-step limit) does not fit
    (run / "config.yaml").write_text(original)
    assert main(["gym", "--eval", str(run), "--episodes", "1", "env_kwargs={max_episode_steps: 200}"]) == 2
    assert "TimeLimit._max_episode_steps=500, but a fresh environment has 200" in one_line(capsys.readouterr().err)


def test_a_run_folder_missing_its_files_is_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", f"output_dir={out}", *LM_FAST, "total_steps=3", "save_every=1"]) == 0
    metrics = (out / "metrics.jsonl").read_text()
    resume = ["train", "--resume", f"output_dir={out}", "total_steps=4"]
    capsys.readouterr()
    (out / "metrics.jsonl").unlink()  # deleted
    assert main(resume) == 2
    msg = one_line(capsys.readouterr().err)
    assert "metrics.jsonl is missing" in msg and "step 3" in msg
    (out / "metrics.jsonl").write_text("".join(metrics.splitlines(keepends=True)[:1]))  # cut to the first row
    assert main(resume) == 2
    msg = one_line(capsys.readouterr().err)
    assert "has no row for step 3" in msg and "last train row is at step 1" in msg
    (out / "metrics.jsonl").write_text(metrics)
    (out / "config.yaml").rename(out / "config.yaml.bak")  # the settings gone: not resumed on defaults
    assert main(resume) == 2
    assert "config.yaml is missing" in one_line(capsys.readouterr().err)
    (out / "config.yaml.bak").rename(out / "config.yaml")
    assert main(resume) == 0
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2, 3, 4]
    # the gym: the same
    run = tmp_path / "g"
    assert main(["gym", *GYM_FAST, "--output-dir", str(run), "total_env_steps=64", "save_every=32"]) == 0
    (run / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert main(["gym", "--output-dir", str(run), "--resume", "total_env_steps=96"]) == 2
    assert "metrics.jsonl is missing" in one_line(capsys.readouterr().err)
