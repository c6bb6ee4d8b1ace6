"""Nothing a user does by habit destroys data: reusing a run folder, resuming, overwriting.
Security settings never come from a run folder. Driven through the command line."""

from __future__ import annotations

import json

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
    assert main(["train", "--overwrite", f"output_dir={out}", *LM_FAST]) == 0
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
