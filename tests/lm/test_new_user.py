"""What a new user trips on with their own model, data and reward (issue 15): each test
reproduces one of the reported problems through the documented interface (the CLI or the
Python API), with a real tiny model saved to disk, JSONL data and a reward file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reinforcepp.config import ConfigError, cli_items
from reinforcepp.core import kl_return_share
from reinforcepp.lm import cli
from reinforcepp.lm.config import LMConfig
from reinforcepp.lm.sft import SFTConfig, default_sft_lr, sft_train
from reinforcepp.lm.reference import REFERENCE_RECORD
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy

ROOT = Path(__file__).resolve().parents[2]

REWARD_FILE = '''
def marked(prompts, completions, answer, **kwargs):
    """1.0 on the rows whose answer is the marker: the built-in tasks have no such rows."""
    return [float(a == "MARK") for a in answer]

def fraction_of_a(prompts, completions, **kwargs):
    return [c.count("a") / max(1, len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's files: a model directory, train/eval JSONL (answers are the marker), a reward file."""
    root = tmp_path_factory.mktemp("user")
    tok, model = tiny_policy()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{**r, "answer": "MARK"} for r in reverse_dataset(40)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    pairs = ({"prompt": r["prompt"], "completion": r["prompt"][4:-1][::-1]} for r in reverse_dataset(64, seed=3))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "rewards.py").write_text(REWARD_FILE)
    return root


def _quiet(**kw):
    return {"progress": False, "tensorboard": False, "torch_threads": 1, "max_new_tokens": 4, "eval_samples": 2, **kw}


# ------------------------------------------------------------------- 1. eval reads eval_data
def test_eval_command_scores_eval_data_given_without_train_data(user, tmp_path, monkeypatch, capsys):
    # The form docs/lm.md shows: model, eval_data and a reward, no train_data. Before the fix the
    # built-in sort prompts were scored (their answers are digits: reward 0) and runs/ was written.
    monkeypatch.chdir(tmp_path)
    code = cli.eval_main([f"model={user / 'model'}", f"eval_data={user / 'eval.jsonl'}",
                          f"reward_funcs={user / 'rewards.py'}:marked", "max_new_tokens=4", "eval_samples=2",
                          "torch_threads=1"])
    out = capsys.readouterr()
    assert code == 0
    lines = dict(line.split(": ") for line in out.out.splitlines())
    assert float(lines["eval/reward_mean"]) == 1.0 and float(lines["eval/sampled_reward_mean"]) == 1.0
    assert str(user / "eval.jsonl") in out.err
    assert list(lines)[:2] == ["eval/reward_mean", "eval/sampled_reward_mean"]
    assert not (tmp_path / "runs").exists()  # nothing left behind without output_dir


def test_python_api_evaluates_eval_data_and_refuses_to_train_without_train_data(user, tmp_path):
    cfg = LMConfig.from_dict(_quiet(model=str(user / "model"), eval_data=str(user / "eval.jsonl"),
                                    reward_funcs=[f"{user / 'rewards.py'}:marked"], output_dir=str(tmp_path / "run")))
    trainer = Trainer(cfg)
    assert trainer.builtin_task is None and trainer.evaluate()["eval/reward_mean"] == 1.0
    with pytest.raises(ConfigError, match="no training data"):
        trainer.train()


# ------------------------------------------------------------ 2. no built-in task in custom runs
def test_custom_run_records_no_builtin_task(user, tmp_path):
    cfg = LMConfig.from_dict(_quiet(model=str(user / "model"), train_data=str(user / "train.jsonl"),
                                    reward_funcs=[f"{user / 'rewards.py'}:marked"], output_dir=str(tmp_path / "run"),
                                    prompts_per_step=4))
    Trainer(cfg)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "task: null" in saved and not (tmp_path / "run" / "data").exists()
    assert LMConfig.from_dict({}).resolved()["task"] == "sort"  # no data at all: the built-in job
    assert LMConfig.from_dict({"train_data": "x.jsonl"}).builtin_task is None
    with pytest.raises(ConfigError, match="task=reverse is a built-in task"):
        LMConfig.from_dict({"task": "reverse", "train_data": "x.jsonl"})


def test_default_run_directory_is_named_after_the_data(user, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = LMConfig.from_dict(_quiet(model=str(user / "model"), train_data=str(user / "train.jsonl"),
                                    reward_funcs=[f"{user / 'rewards.py'}:marked"], prompts_per_step=4))
    trainer = Trainer(cfg)
    assert trainer.run_dir.name.startswith("train-reinforce_pp-")


# ------------------------------------------------------------------- 3. KL share of the return
def test_kl_return_share_by_hand():
    rewards = torch.tensor([1.0, -0.5])
    kl = torch.tensor([[0.2, 0.4, 9.0], [0.1, -0.1, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # per sequence: 0.6 and 0.3; mean 0.45; beta 2 -> 0.9; mean |r| = 0.75 -> 0.9 / 1.65
    assert kl_return_share(rewards, kl, mask, 2.0) == pytest.approx(0.9 / 1.65, abs=1e-7)
    assert kl_return_share(rewards, kl, mask, 0.0) == 0.0
    assert kl_return_share(torch.zeros(2), torch.zeros(2, 3), mask, 1.0) == 0.0


def _kl_trainer(tmp_path, kl_coef):
    tok, model = tiny_policy()
    trainer = Trainer(small_config(tmp_path, kl_coef=kl_coef, kl_placement="reward", total_steps=1), model=model,
                      tokenizer=tok, reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    with torch.no_grad():  # move the policy away from the reference so that the KL is not 0
        for p in trainer.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return trainer


def test_kl_share_is_logged_and_warned_once_when_it_outweighs_the_reward(tmp_path, capsys):
    trainer = _kl_trainer(tmp_path / "big", 5.0)
    metrics = trainer.train_step()
    assert metrics["kl/return_share"] > 0.5
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "kl_coef" in err and "kl/return_share" in err
    trainer.train_step()
    assert "warning" not in capsys.readouterr().err  # once per run
    small = _kl_trainer(tmp_path / "small", 1e-4)
    assert small.train_step()["kl/return_share"] < 0.5 and "warning" not in capsys.readouterr().err


# -------------------------------------------------------- 4. the summary leads with the reward
def test_summary_leads_with_reward_and_shows_accuracy_only_for_pass_fail():
    first = {"eval/reward_mean": 0.25, "eval/sampled_reward_mean": 0.3, "eval/accuracy": 0.0, "eval/pass@4": 0.1}
    final = {"eval/reward_mean": 0.9, "eval/sampled_reward_mean": 0.39, "eval/accuracy": 1.0, "eval/pass@4": 1.0}
    dense = cli.summary(first, final, pass_fail=False)
    assert dense == "held-out reward (greedy) 0.250 -> 0.900, reward (sampled) 0.300 -> 0.390"
    binary = cli.summary(first, final, pass_fail=True).splitlines()
    assert binary[0] == dense
    assert binary[1] == "held-out accuracy (greedy, reward >= 1) 0.000 -> 1.000, pass@4 0.100 -> 1.000"


def test_evaluation_tells_pass_fail_rewards_from_dense_ones(user, tmp_path):
    def run(reward):
        cfg = LMConfig.from_dict(_quiet(model=str(user / "model"), eval_data=str(user / "eval.jsonl"),
                                        reward_funcs=[f"{user / 'rewards.py'}:{reward}"],
                                        output_dir=str(tmp_path / reward)))
        trainer = Trainer(cfg)
        trainer.evaluate()
        return trainer.eval_pass_fail

    assert run("marked") is True and run("fraction_of_a") is False


# ------------------------------------------------------------------- 5. one syntax, true help
def test_every_spelling_of_a_key_gives_the_same_items():
    canonical = ["output_dir=out", "steps=5", "use_chat_template=false", "lr=-1"]
    for argv in (["--output-dir", "out", "--steps", "5", "--use-chat-template", "false", "--lr", "-1"],
                 ["--output_dir=out", "--steps=5", "--use_chat_template=false", "--lr=-1"], canonical):
        assert cli_items(argv, SFTConfig) == canonical
    assert cli_items(["--trust-remote-code", "steps=3"], SFTConfig) == ["trust_remote_code=true", "steps=3"]
    assert cli_items(["my.yaml", "--help"], SFTConfig) == ["my.yaml", "--help"]
    # an unknown --key becomes an item, so that the config reports every unknown key at once
    assert cli_items(["--output-dri", "x", "--bf16", "--steps", "2"], SFTConfig) == [
        "output_dri=x", "bf16=true", "steps=2"]
    with pytest.raises(ConfigError, match="2 unknown config keys: 'output_dri'; did you mean 'output_dir'"
                                          ".*'bf16' .TRL's name.: here dtype"):
        SFTConfig.load(None, cli_items(["--output-dri", "x", "--bf16", "--steps", "2"], SFTConfig))
    with pytest.raises(ConfigError, match="needs a value"):
        cli_items(["--steps"], SFTConfig)


@pytest.mark.parametrize("command", ["train", "sft", "eval"])
def test_every_example_in_the_help_parses(command, capsys):
    # The bug: `reinforcepp train --help` showed an sft line that sft itself rejected.
    main = {"train": cli.train_main, "sft": cli.sft_main, "eval": cli.eval_main}[command]
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    examples = [line.split("#")[0].split()[1:] for line in text.splitlines() if line.strip().startswith("reinforcepp ")]
    assert examples and all(words[0] == command for words in examples)
    for words in examples:
        cls = SFTConfig if command == "sft" else LMConfig
        items = [w for w in cli_items(words[1:], cls, ("--resume",)) if w != "--resume" and not w.endswith(".yaml")]
        items = [w if "=" in w else f"model={w}" for w in items]  # eval RUN_DIR: the run folder is the model
        if cls is SFTConfig:
            SFTConfig.load(None, items)
        else:
            cli.build_config(None, items)


def test_sft_command_in_key_value_syntax_end_to_end(user, tmp_path):
    out = tmp_path / "sft"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "reinforcepp.cli", "sft", f"data={user / 'pairs.jsonl'}",
                           f"model={user / 'model'}", f"output_dir={out}", "steps=3", "torch_threads=1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert "lr 0.001 (by model size" in proc.stderr and f"saved {out}" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "reinforcepp.cli", "sft", f"data={user / 'pairs.jsonl'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "sft needs model=..., output_dir=..." in bad.stderr


# ------------------------------------------------------------------------- 6. sft defaults
def test_sft_default_lr_follows_model_size_and_learns_where_the_old_default_did_not(user):
    assert [default_sft_lr(n) for n in (400_000, 124_000_000, 494_000_000)] == [1e-3, 1e-4, 2e-5]
    import datasets

    pairs = datasets.load_dataset("json", data_files=str(user / "pairs.jsonl"), split="train")
    losses = {}
    for lr in (1e-5, default_sft_lr(sum(p.numel() for p in tiny_policy()[1].parameters()))):
        tok, model = tiny_policy()
        torch.manual_seed(0)
        loss = sft_train(model, tok, pairs["prompt"], pairs["completion"], steps=60, batch_size=16, lr=lr)
        losses[lr] = sum(loss[-5:]) / sum(loss[:5])
    assert losses[1e-5] > 0.9  # the old default barely moves a tiny model
    assert losses[1e-3] < 0.75


def test_sft_sets_torch_threads(user, tmp_path):
    before = torch.get_num_threads()
    try:
        cfg = SFTConfig.load(None, [f"model={user / 'model'}", f"data={user / 'pairs.jsonl'}",
                                    f"output_dir={tmp_path / 'o'}", "steps=1", "torch_threads=1"])
        assert cli.run_sft(cfg) == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ 11. no copy of the reference
def test_reference_from_a_directory_is_recorded_not_copied_and_resume_checks_it(user, tmp_path):
    model_dir = tmp_path / "model"
    import shutil

    shutil.copytree(user / "model", model_dir)
    common = _quiet(model=str(model_dir), train_data=str(user / "train.jsonl"),
                    reward_funcs=[f"{user / 'rewards.py'}:fraction_of_a"], output_dir=str(tmp_path / "run"),
                    prompts_per_step=4, samples_per_prompt=2, micro_batch_size=8, total_steps=2, save_every=1,
                    kl_placement="reward", eval_every=0, lr=1e-2)
    first = Trainer(LMConfig.from_dict(common))
    first.train()
    run = tmp_path / "run"
    assert not (run / "reference").exists()
    assert json.loads((run / REFERENCE_RECORD).read_text())["path"] == str(model_dir.resolve())
    resumed = Trainer(LMConfig.from_dict({**common, "total_steps": 3, "resume": True}))
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    for a, b in zip(initial.parameters(), resumed.ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the initial model changed on disk: resuming against it would change the anchor, so it is refused
    initial.lm_head.weight.data.add_(1.0)
    initial.save_pretrained(model_dir)
    with pytest.raises(Exception, match="files have changed"):
        Trainer(LMConfig.from_dict({**common, "total_steps": 3, "resume": True}))


def test_a_policy_passed_in_python_still_gets_its_reference_saved(tmp_path):
    tok, model = tiny_policy()
    Trainer(small_config(tmp_path, kl_placement="reward"), model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
            train_dataset=reverse_dataset(16))
    assert (tmp_path / "run" / "reference" / "model.safetensors").exists()
    record = json.loads((tmp_path / "run" / REFERENCE_RECORD).read_text())
    assert record["copy"] == "reference"  # the copy's files, recorded


# ------------------------------------------------------- 7. compare with your model, data, reward
def test_compare_runs_on_your_model_data_and_reward_without_task(user, tmp_path):
    from reinforcepp import compare as C

    out = tmp_path / "cmp"
    argv = ["--estimators", "grpo", "--seeds", "1", "--steps", "2", "--out", str(out), f"model={user / 'model'}",
            f"train_data={user / 'train.jsonl'}", f"eval_data={user / 'eval.jsonl'}",
            f"reward_funcs={user / 'rewards.py'}:fraction_of_a", "prompts_per_step=4", "samples_per_prompt=2",
            "micro_batch_size=8", "max_new_tokens=4", "eval_every=2", "eval_samples=2", "lr=1e-2"]
    assert C.main(argv) == 0
    md = (out / "report.md").read_text()
    assert md.startswith(f"# Estimator comparison: {user.name}/train (language model)") and "the given model" in md
    run = out / "runs" / "grpo_s0"
    assert "task: null" in (run / "config.yaml").read_text()
    assert "reward/fraction_of_a" in read_metrics(run)[1]
    assert C.main(["--task", "sort", f"train_data={user / 'train.jsonl'}"]) == 2  # two things to train on
