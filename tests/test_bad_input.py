"""Every bad input exits with code 2 and one line naming the culprit, no traceback (unless
--debug), in train, sft, eval, gym and compare."""

from __future__ import annotations

import json
import re

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
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"prompt": "ab" * (i % 9 + 1)}) + "\n" for i in range(50)))
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
    refused(capsys, [*train, f"train_data={files / 'good.jsonl'}", "reward_funcs=rm:/no/such/rm"],
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


# ------------------------------------------------------------ a reward that ends the process
EXITING_REWARD = """import os, sys
def exits(prompts, completions, trainer_state, **kw):
    if trainer_state.global_step >= 1:  # the second step
        {call}
    return [0.5] * len(completions)
"""


@pytest.mark.parametrize("call", ["sys.exit(3)", "os._exit(0)"])
def test_a_reward_that_exits_is_reported_by_name_and_the_checkpoint_kept(tmp_path, call):
    import subprocess
    import sys
    from pathlib import Path

    from reinforcepp.run import CheckpointManager

    (tmp_path / "exits.py").write_text(EXITING_REWARD.format(call=call))
    out = tmp_path / "r"
    argv = ["train", f"output_dir={out}", *FAST, "total_steps=3", "save_every=1",
            f"reward_funcs={tmp_path / 'exits.py'}:exits"]
    # in a child process: os._exit would end this test's process if it were not caught
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "reinforcepp.cli", *argv], capture_output=True, text=True, cwd=root,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("reinforcepp train: reward source 'exits'") and f"called {call} while scoring" in line, line
    assert f"the last checkpoint ({out / 'checkpoints' / 'step_00000001'}) is intact" in line
    assert f"reward_funcs={tmp_path / 'exits.py'}:exits" in line  # the resume command gives the reward again
    assert CheckpointManager(out).latest_intact() == out / "checkpoints" / "step_00000001"
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1]
    # fixed, the run continues from its checkpoint
    assert main(["train", "--resume", f"output_dir={out}", "total_steps=3", REWARD]) == 0
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2, 3]


def test_a_reward_exit_in_either_error_mode_and_in_python(tmp_path):
    from reinforcepp.rewards import RewardExitError, RewardScorer, RewardSource, call_reward_function

    def bye(prompts, completions, **_):
        raise SystemExit("bye")

    def hard(prompts, completions, **_):
        import os

        os._exit(7)

    for on_error in ("raise", "drop"):
        for fn, call in ((bye, "sys.exit('bye')"), (hard, "os._exit(7)")):
            scorer = RewardScorer([RewardSource("r", fn)], on_error=on_error)
            pattern = rf"reward source 'r' .* called {re.escape(call)}"
            with pytest.raises(RewardExitError, match=pattern):
                scorer(["p"], ["c"], {})
    with pytest.raises(RewardExitError, match="called os._exit"):
        call_reward_function(hard, ["p"], ["c"], {})
    # outside reward calls (and in forked children) os._exit is the real one
    import subprocess
    import sys

    code = ("import os\nfrom reinforcepp.rewards import call_reward_function\n"
            "call_reward_function(lambda prompts, completions: [1.0], ['p'], ['c'], {})\n"
            "pid = os.fork()\nif pid == 0:\n    os._exit(4)\n_, status = os.waitpid(pid, 0)\n"
            "os._exit(os.waitstatus_to_exitcode(status) + 1)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 5


# ------------------------------------------- the silent or deep exits, each one line and exit 2
@pytest.fixture
def more(files):
    (files / "list.yaml").write_text("- lr: 1e-3\n- seed: 1\n")
    (files / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (files / "empty_prompt.jsonl").write_text('{"prompt": "ab"}\n{"prompt": ""}\n{"prompt": "cd"}\n')
    (files / "blank_prompt.jsonl").write_text('{"prompt": "ab"}\n{"prompt": "  "}\n')
    (files / "latin1.jsonl").write_bytes('{"prompt": "ab"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (files / "latin1.csv").write_bytes("prompt\nab\ncaf\xe9\n".encode("latin-1"))
    rows = [{"prompt": "ab"}] * 40 + [{"prompt": "a" * 80}] + [{"prompt": "cd"}] * 9
    (files / "long_at_40.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (files / "notamodel").mkdir()
    (files / "notamodel" / "readme.txt").write_text("hi")
    (files / "rewards.py").write_text("def fails(prompts, completions, **kw):\n    raise ValueError('boom')\n"
                                      "def same(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    return files


TRAIN_CASES = [
    (["kl_coef=inf"], ("kl_coef must be a finite number, got inf",)),
    (["lr=nan"], ("lr must be a finite number, got nan",)),
    (["lr=1e38", "max_grad_norm=1e39"], ("lr=1e+38 is too large", "10 x lr")),
    (["max_grad_norm=1e39"], ("max_grad_norm=1e+39 is beyond float32's range",)),
    (["reward_weights=[1.0, .inf]"], ("reward_weights must be a finite number, got inf",)),
    (["reward_funcs=[a,"], ("reward_funcs='[a,' is not a valid list",)),
    (["{dir}/list.yaml"], ("list.yaml: the config file must be a mapping of key: value, got a list",)),
    (["{dir}/binary.yaml"], ("binary.yaml: not a text file",)),
    (["train_data={dir}/empty_prompt.jsonl", REWARD], ("empty_prompt.jsonl row 1: the prompt is empty",)),
    (["train_data={dir}/blank_prompt.jsonl", REWARD], ("blank_prompt.jsonl row 1: the prompt is empty",)),
    (["train_data={dir}/latin1.jsonl", REWARD], ("latin1.jsonl:2: not UTF-8 text (byte 0xe9",)),
    (["train_data={dir}/latin1.csv", REWARD], ("latin1.csv:3: not UTF-8 text (byte 0xe9 at column 4)",)),
    (["train_data={dir}/long_at_40.jsonl", REWARD], ("long_at_40.jsonl row 40: a prompt has 80 tokens > 60 allowed",)),
    (["model={dir}/notamodel"], ("model=", "notamodel: not a model folder: no config.json in it", "readme.txt")),
    (["model={dir}/nomodel"], ("model=", "nomodel: no such model folder",)),
    (["model={dir}/latin1.csv"], ("latin1.csv: a file, not a model folder",)),
    (["tokenizer={dir}/notamodel"], ("tokenizer=", "not a tokenizer folder")),
    (["task=sort", "reward_on_error=drop", "reward_funcs={dir}/rewards.py:fails"],
     ("step 1: every group was dropped, nothing to train on", "reward source 'fails'")),
    (["task=sort", "dynamic_filtering=true", "max_filter_rounds=2", "reward_funcs={dir}/rewards.py:same"],
     ("step 1: every group was dropped, nothing to train on", "all-equal rewards (dynamic_filtering")),
]


@pytest.mark.parametrize("argv, expected", TRAIN_CASES)
def test_every_silent_or_deep_exit_is_one_line(capsys, more, argv, expected):
    out = more / "r"
    argv = [a.format(dir=more) for a in argv]
    refused(capsys, ["train", f"output_dir={out}", *FAST, *argv], *expected)
    assert not (out / "checkpoints").exists()  # nothing trained


def test_gym_config_files_and_floats(capsys, more):
    gym = ["gym", "--output-dir", str(more / "g")]
    refused(capsys, [*gym, "--config", str(more / "binary.yaml")], "binary.yaml: not a text file")
    refused(capsys, [*gym, "--config", str(more / "list.yaml")], "must be a mapping of key: value")
    (more / "broken.yaml").write_text("lr: [1e-3\nseed: 2\n")
    refused(capsys, [*gym, "--config", str(more / "broken.yaml")], "broken.yaml: not valid YAML (",
            "at line 2")
    refused(capsys, ["train", str(more / "broken.yaml"), f"output_dir={more / 'r'}"], "broken.yaml: not valid YAML (")
    refused(capsys, ["gym", "--output-dir", str(more / "g"), "lr=inf"], "lr must be a finite number, got inf")
    refused(capsys, [*gym, "env_kwargs={a: [1"], "env_kwargs=", "is not a valid mapping")


def test_every_float_option_must_be_finite():
    from reinforcepp.config import ConfigError
    from reinforcepp.gym.config import GymConfig
    from reinforcepp.lm.config import LMConfig

    import typing

    for cls in (LMConfig, GymConfig):
        types_ = cls.field_types()
        floats = [k for k, tp in types_.items() if tp is float or float in typing.get_args(tp)]
        assert len(floats) >= 15, floats
        for key in floats:
            listed = typing.get_origin(types_[key]) is list
            for bad in ([float("inf")], [1.0, float("nan")]) if listed else (float("inf"), float("nan"), float("-inf")):
                with pytest.raises(ConfigError, match=f"^{key} must be a finite number"):
                    cls.from_dict({key: bad})
