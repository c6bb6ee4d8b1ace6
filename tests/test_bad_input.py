"""Every bad input exits with code 2 and one line naming the culprit, no traceback (unless
--debug), in train, sft, eval, gym and compare."""

from __future__ import annotations

import json

import pytest

from reinforcepp.cli import main
from reinforcepp.errors import InputError
from reinforcepp.run import read_metrics

FAST = ["sft_steps=0", "total_steps=1", "prompts_per_step=2", "samples_per_prompt=2", "micro_batch_size=4",
        "max_new_tokens=4", "eval_every=0", "tensorboard=false", "progress=false", "log_samples_every=0"]
REWARD = "reward_funcs=tests.lm.helpers:fraction_of_a"


def refused(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = [x for x in err.strip().splitlines() if x.strip()][-1]
    assert line.startswith(f"reinforcepp {argv[0]}: "), line
    for text in expected:
        assert text in line, (text, line)
    return line


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ab"}\n{"prompt": "cd",\n{"prompt": "ef"}\n')
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"prompt": "a" * 90 + str(i)}) + "\n" for i in range(4)))
    return tmp_path


@pytest.mark.parametrize("argv, expected", [
    (["learning_rate=1e-3"], ("'learning_rate'", "did you mean 'lr'")),
    (["lr=-1"], ("lr must be > 0, got -1",)),
    (["top_k=-5"], ("top_k must be >= 0, got -5",)),
    (["save_every=-1"], ("save_every must be >= 0, got -1",)),
    (["estimator=reinforce_ppp"], ("unknown estimator 'reinforce_ppp'",)),
])
def test_train_config_errors(capsys, tmp_path, argv, expected):
    refused(capsys, ["train", f"output_dir={tmp_path / 'r'}", *FAST, *argv], *expected)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_train_data_and_reward_errors(capsys, files):
    out = f"output_dir={files / 'r'}"
    train = ["train", out, *FAST]
    refused(capsys, [*train, REWARD, f"train_data={files / 'empty.jsonl'}"], "empty.jsonl: the file holds no rows")
    refused(capsys, [*train, REWARD, f"train_data={files / 'bad.jsonl'}"], "bad.jsonl:2: not valid JSON")
    refused(capsys, [*train, REWARD, f"train_data={files / 'missing.jsonl'}"], "missing.jsonl", "not found")
    refused(capsys, [*train, f"train_data={files / 'long.jsonl'}", "reward_funcs=rm:/no/such/rm"],
            "rm:/no/such/rm", "does not exist")
    refused(capsys, [*train, REWARD, f"train_data={files / 'long.jsonl'}", "eval_fraction=0", "prompts_per_step=8"],
            "long.jsonl: 4 training prompts, fewer than prompts_per_step=8")
    refused(capsys, ["train", out, *FAST, "task_size=1"],
            "the built-in task 'sort' (task_size=1): 1 training prompt, fewer than prompts_per_step=2")


def test_prompts_longer_than_the_context_are_refused_or_truncated(capsys, files):
    # the built-in tiny model has 64 positions: a 91-token prompt cannot fit
    refused(capsys, ["train", f"output_dir={files / 'a'}", *FAST, REWARD, f"train_data={files / 'long.jsonl'}"],
            "a prompt has 91 tokens > 60 allowed", "truncate_prompts=true")
    assert main(["train", f"output_dir={files / 'b'}", *FAST, REWARD, f"train_data={files / 'long.jsonl'}",
                 "truncate_prompts=true"]) == 0
    row = [r for r in read_metrics(files / "b") if r["kind"] == "train"][-1]
    assert row["data/truncated_prompts"] == 2.0  # the two prompts of the one step


def test_sft_eval_gym_compare_errors(capsys, files):
    refused(capsys, ["sft", "--data", str(files / "missing.jsonl"), "--model", str(files / "nomodel"),
                     "--output-dir", str(files / "o")], "nomodel")
    refused(capsys, ["sft", "--data", str(files / "x.jsonl"), "--model", "m", "--output-dir", str(files / "o"),
                     "--lr", "-1"], "lr must be > 0")
    refused(capsys, ["eval", "learning_rate=1"], "did you mean 'lr'")
    refused(capsys, ["gym", "--output-dir", str(files / "g"), "lr=-1"], "lr must be > 0")
    refused(capsys, ["gym", "--output-dir", str(files / "g"), "--env", "NoSuchEnv-v9"], "NoSuchEnv")
    refused(capsys, ["gym", "--output-dir", str(files / "g"), "total_timesteps=10"], "did you mean 'total_env_steps'")
    refused(capsys, ["compare", "--env", "CartPole-v1", "--estimators", "reinforce_pp", "--out", str(files / "c"),
                     "lr=-1"], "lr must be > 0")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(InputError, match="lr must be > 0"):
        main(["train", "--debug", f"output_dir={tmp_path / 'r'}", *FAST, "lr=-1"])
