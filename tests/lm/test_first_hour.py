"""The first hour, second pass (issue 25): what a new user (and a TRL user) met after the first
pass, each through the documented interface: a stopped run and its resume, evaluating a run
folder, one name per number, a trainer that only evaluates, TRL's option names, the options by
topic, and the plots."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from reinforcepp.cli import main
from reinforcepp.config import ConfigError, other_name, other_names_table
from reinforcepp.gym import GymConfig
from reinforcepp.lm import cli
from reinforcepp.lm.config import LMConfig
from reinforcepp.lm.sft import SFTConfig
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run import read_metrics
from reinforcepp.run.plots import choose_panels, run_title, y_range
from tests.lm.helpers import reverse_dataset, tiny_policy

ROOT = Path(__file__).resolve().parents[2]

REWARD_FILE = '''
def fraction_of_a(prompts, completions, **kwargs):
    return [c.count("a") / max(1, len(c)) for c in completions]
'''

FAST = ["prompts_per_step=4", "samples_per_prompt=2", "micro_batch_size=8", "max_new_tokens=4",
        "eval_samples=2", "eval_max_prompts=4", "tensorboard=false", "progress=false", "log_samples_every=0",
        "torch_threads=1", "lr=1e-2"]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    tok, model = tiny_policy()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = list(reverse_dataset(24))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    (root / "rewards.py").write_text(REWARD_FILE)
    return root


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    return [line for line in err.strip().splitlines() if line.strip()][-1]


def user_items(user: Path, run: Path) -> list[str]:
    return [f"model={user / 'model'}", f"train_data={user / 'train.jsonl'}", f"eval_data={user / 'eval.jsonl'}",
            f"reward_funcs={user / 'rewards.py'}:fraction_of_a", f"output_dir={run}", *FAST]


# ------------------------------------------------------------------ 1. a run that stops
def test_checkpoints_every_ten_steps_by_default():
    assert LMConfig().save_every == 10 and LMConfig.tiny().save_every == 10


def test_periodic_checkpoints_do_not_change_the_training(tmp_path):
    def run(save_every):
        tok, model = tiny_policy()
        cfg = LMConfig.from_dict(dict(output_dir=str(tmp_path / f"s{save_every}"), total_steps=3, prompts_per_step=4,
                                      samples_per_prompt=4, micro_batch_size=8, max_new_tokens=4, lr=1e-2, eval_every=0,
                                      progress=False, tensorboard=False, torch_threads=1, kl_coef=0.05,
                                      kl_placement="reward", save_every=save_every, deterministic=True))
        from tests.lm.helpers import fraction_of_a

        trainer = Trainer(cfg, model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
                          train_dataset=reverse_dataset(16))
        trainer.train()
        rows = [{k: v for k, v in r.items() if not k.startswith(("time", "tokens_per_s", "perf/"))}
                for r in read_metrics(trainer.run_dir)]
        return rows, [p.detach().clone() for p in trainer.policy.parameters()], trainer.checkpoints.complete()

    rows0, weights0, saved0 = run(0)
    rows1, weights1, saved1 = run(1)
    assert rows0 == rows1
    for a, b in zip(weights0, weights1):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert [p.name for p in saved0] == ["step_00000003"]
    assert [p.name for p in saved1] == ["step_00000002", "step_00000003"]


def test_resume_says_its_step_and_a_folder_without_checkpoint_names_the_command_that_starts_it_again(
    user, tmp_path, capsys
):
    run = tmp_path / "run"
    items = user_items(user, run)
    assert main(["train", *items, "total_steps=3", "save_every=2", "eval_every=0"]) == 0
    shutil.rmtree(run / "checkpoints" / "step_00000003")  # killed after the checkpoint of step 2
    capsys.readouterr()
    reward = f"reward_funcs={user / 'rewards.py'}:fraction_of_a"  # code is never taken from the folder
    model = f"model={user / 'model'}"  # nor a model
    assert main(["train", "--resume", f"output_dir={run}", reward]) == 2
    assert "sets model=" in one_line(capsys.readouterr().err)
    assert main(["train", "--resume", f"output_dir={run}", model, reward]) == 0
    err = capsys.readouterr().err
    assert f"resume: continuing from step 2 of 3 (checkpoint {run / 'checkpoints' / 'step_00000002'})" in err
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]

    # A run that stopped before its first checkpoint: refused, with the command that starts it again.
    stopped = tmp_path / "stopped"
    assert main(["train", *user_items(user, stopped), "total_steps=2", "save_every=0", "eval_every=0"]) == 0
    shutil.rmtree(stopped / "checkpoints")
    capsys.readouterr()
    assert main(["train", "--resume", f"output_dir={stopped}", reward]) == 2
    line = one_line(capsys.readouterr().err)
    assert (f"{stopped} holds no complete checkpoint: it logged 2 of 2 steps; "
            "it was set to save only at the end (save_every=0)") in line
    assert "save_every=10 keeps a checkpoint every 10 steps" in line
    assert "--overwrite moves the old folder aside" in line
    command = line.split("Start it again with `")[1].split("`")[0]
    words = shlex.split(command)
    assert words[:4] == ["reinforcepp", "train", "--overwrite", f"output_dir={stopped}"]
    given = dict(w.split("=", 1) for w in [*user_items(user, stopped)[:4], *FAST, "total_steps=2", "eval_every=0"])
    printed = dict(w.split("=", 1) for w in words[4:])
    assert sorted(printed) == sorted(given) and printed["reward_funcs"] == given["reward_funcs"]
    assert float(printed["lr"]) == 0.01
    assert main(words[1:]) == 0  # the command as printed starts the run again
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("stopped.old-")]
    # Nothing there at all: the message says so, and names the command without --overwrite.
    capsys.readouterr()
    assert main(["train", "--resume", f"output_dir={tmp_path / 'never'}", reward]) == 2
    line = one_line(capsys.readouterr().err)
    assert "holds no run to resume; start one with `reinforcepp train output_dir=" in line and "--overwrite" not in line


# ------------------------------------------------------------------ 3. evaluating a run folder
def test_eval_of_a_run_folder_repeats_the_runs_final_evaluation(user, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *user_items(user, run), "total_steps=2", "eval_every=2", "max_new_tokens=5", "seed=3"]) == 0
    final = [r for r in read_metrics(run) if r["kind"] == "eval"][-1]
    capsys.readouterr()
    reward = f"reward_funcs={user / 'rewards.py'}:fraction_of_a"
    for target in ([str(run), reward], [f"model={run}", reward],
                   [f"model={run / 'checkpoints' / 'step_00000002' / 'model'}", reward]):
        assert main(["eval", *target, "torch_threads=1"]) == 0
        out = capsys.readouterr()
        printed = dict(line.split(": ") for line in out.out.splitlines())
        assert printed == {k: f"{v:.4f}" for k, v in final.items() if k.startswith("eval/")}, target
        assert "checkpoint of step 2" in out.err and "max_new_tokens=5" in out.err and "seed=3" in out.err
    # the reward names code: never taken from the folder, so it must be given again
    assert main(["eval", str(run)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "eval: the run folder's config.yaml sets reward_funcs=" in line and "never taken from a run folder" in line
    # the run's own config.yaml is not the settings of another model
    assert main(["eval", str(run / "config.yaml")]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"is the saved config of the run {run}" in line and f"`reinforcepp eval {run}`" in line
    # folders that are not models, and missing ones, in one line naming them
    assert main(["eval", f"model={user}"]) == 2
    assert f"model={user} is a folder but not a model: no config.json" in one_line(capsys.readouterr().err)
    assert main(["eval", f"model={tmp_path / 'nothing'}"]) == 2
    assert f"model={tmp_path / 'nothing'}: no such folder" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_eval_lowers_a_default_max_new_tokens_that_does_not_fit_and_refuses_a_given_one(
    user, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    common = ["eval", f"model={user / 'model'}", f"eval_data={user / 'eval.jsonl'}",
              f"reward_funcs={user / 'rewards.py'}:fraction_of_a", "eval_samples=1", "torch_threads=1"]
    # one token per character
    longest = max(len(json.loads(line)["prompt"]) for line in (user / "eval.jsonl").read_text().splitlines())
    assert main([*common, "max_new_tokens=100"]) == 2
    assert one_line(capsys.readouterr().err).endswith(
        "max_new_tokens=100 does not fit the model's context of 64 tokens "
        f"after held-out prompts of up to {longest} tokens: "
        f"set max_new_tokens={64 - longest} or less")
    assert main(common) == 0  # the default, 256, is lowered with a note
    assert "max_new_tokens=256 (the default) does not fit" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------ 4. names, summaries, writes
def test_summary_names_the_any_correct_number_and_a_run_without_evaluation_reports_its_training_reward(
    user, tmp_path, capsys
):
    first = {"eval/reward_mean": 0.25, "eval/sampled_reward_mean": 0.3, "eval/accuracy": 0.0,
             "eval/any_correct_of_4": 0.5, "eval/pass@2": 0.4}
    final = {"eval/reward_mean": 0.9, "eval/sampled_reward_mean": 0.4, "eval/accuracy": 1.0,
             "eval/any_correct_of_4": 1.0, "eval/pass@2": 0.9}
    assert cli.summary(first, final, True).splitlines()[1] == (
        "held-out accuracy (greedy, reward >= 1) 0.000 -> 1.000, any_correct_of_4 0.500 -> 1.000")
    run = tmp_path / "run"
    assert main(["train", *user_items(user, run)[:2], f"reward_funcs={user / 'rewards.py'}:fraction_of_a",
                 f"output_dir={run}", *FAST, "total_steps=2", "eval_every=0"]) == 0
    rewards = [r["reward/mean"] for r in read_metrics(run)]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"train reward {rewards[0]:.3f} -> {rewards[1]:.3f} (mean of the first and last 1 of 2 steps); "
                      "no held-out evaluation (set eval_data, or eval_fraction, and eval_every > 0)")


def test_a_trainer_that_only_evaluates_writes_nothing_and_training_writes_the_run_folder(user, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluating = Trainer(LMConfig.from_dict({"model": str(user / "model"), "eval_data": str(user / "eval.jsonl"),
                                              "max_new_tokens": 4, "eval_samples": 2,
                                              "reward_funcs": [f"{user / 'rewards.py'}:fraction_of_a"],
                                              "progress": False}))
    assert set(evaluating.evaluate()) >= {"eval/reward_mean", "eval/any_correct_of_2", "eval/pass@1"}
    builtin = Trainer(LMConfig.tiny(sft_steps=0, total_steps=1, prompts_per_step=4, samples_per_prompt=2,
                                    micro_batch_size=8, eval_max_prompts=4, progress=False, tensorboard=False))
    builtin.evaluate()
    assert list(tmp_path.iterdir()) == []
    builtin.train()  # now the folder is claimed and written, the task's data and the reference included
    assert sorted(p.name for p in builtin.run_dir.iterdir()) == ["checkpoints", "config.yaml", "data", "metrics.jsonl",
                                                                 "plots.png", "reference", "reference.json"]
    assert builtin.run_dir.resolve().parent == tmp_path / "runs" and (builtin.run_dir / "data" / "eval.jsonl").exists()
    assert [r["kind"] for r in read_metrics(builtin.run_dir)] == ["eval", "train", "eval"]


# ------------------------------------------------------------------ 5. TRL's names, options by topic
def test_trl_names_get_their_equivalents_and_every_unknown_key_is_reported_at_once(capsys, tmp_path):
    assert main(["train", f"output_dir={tmp_path / 'r'}", "num_iterations=2", "epsilon=0.1", "logging_steps=5",
                 "--bf16", "--per-device-train-batch-size", "8", "lerning_rate=1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("reinforcepp train: 6 unknown config keys: ")
    for text in ("'num_iterations' (TRL's name): here epochs; passes over each rollout",
                 "'epsilon' (TRL's name): here eps_low and eps_high; TRL's epsilon sets both clips",
                 "'logging_steps' (TRL's name): here log_samples_every; every step's metrics are logged",
                 "'bf16' (TRL's name): here dtype; dtype=bfloat16",
                 "'per_device_train_batch_size' (TRL's name): here micro_batch_size",
                 "'lerning_rate'; did you mean 'lr'?"):
        assert text in line, text
    assert not (tmp_path / "r").exists()
    assert other_name("max_steps", LMConfig.field_types()).keys == ("total_steps",)
    assert other_name("max_steps", SFTConfig.field_types()).keys == ("steps",)
    assert other_name("per_device_train_batch_size", SFTConfig.field_types()).keys == ("batch_size",)
    assert other_name("logging_steps", GymConfig.field_types()) is None  # gym has no log_samples_every
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'; did you mean 'lr'"):
        LMConfig.from_dict({"learning_rate": 1e-6})


def test_list_options_puts_the_common_keys_first_and_every_key_once_under_a_topic(capsys):
    assert main(["train", "--list-options"]) == 0
    text = capsys.readouterr().out
    assert text == LMConfig.describe() + "\n" and text.startswith("### Most used\n")
    keys = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]
    assert sorted(keys) == sorted(LMConfig.field_types()) and len(keys) == len(set(keys))
    assert keys.index("lr") < 10 and keys.index("total_steps") < 10
    assert keys[:4] == ["model", "train_data", "eval_data", "reward_funcs"]
    topics = [line[4:] for line in text.splitlines() if line.startswith("### ")]
    assert topics[:3] == ["Most used", "Run folder and logging", "Models"] and "Generation" in topics
    # a field the lead adds to a section joins that section: the topic of a key is the last start before it
    rows = text.split("### Generation")[1].split("###")[0]
    assert "`temperature`" in rows and "`eval_samples`" not in rows


def test_the_docs_option_tables_are_describe_and_the_trl_table(capsys):
    lm_doc, gym_doc = (ROOT / "docs" / "lm.md").read_text(), (ROOT / "docs" / "gym.md").read_text()
    assert LMConfig.describe() in lm_doc, "regenerate docs/lm.md's option tables from LMConfig.describe()"
    assert SFTConfig.describe() in lm_doc, "regenerate docs/lm.md's sft table from SFTConfig.describe()"
    assert other_names_table(LMConfig, "TRL") in lm_doc, (
        "regenerate docs/lm.md's TRL table from other_names_table(LMConfig, 'TRL')")
    assert GymConfig.describe() in gym_doc, "regenerate docs/gym.md's option table from GymConfig.describe()"


# ------------------------------------------------------------------ 6. plots
def test_plots_choose_panels_that_answer_did_it_work(tmp_path):
    rows = [{"step": s, "kind": "train", "reward/mean": 0.1 * s, "kl/mean_token": 0.01, "entropy": 1.0,
             "response/length_mean": 5.0, "clip/frac_low": 0.0, "clip/frac_high": 0.0, "approx_kl": 0.0,
             "loss/policy": 1e-7} for s in range(1, 6)]
    rows += [{"step": s, "kind": "eval", "eval/reward_mean": 0.5, "eval/sampled_reward_mean": 0.4,
              "eval/accuracy": 0.99, "eval/pass@1": 0.99, "eval/any_correct_of_8": 1.0} for s in (0, 5)]
    titles = [p.title for p in choose_panels(rows)]
    assert titles == ["reward", "held-out accuracy (reward >= 1)", "KL to the reference, per token",
                      "entropy per token", "response length (tokens)"]
    rows[0]["clip/frac_high"] = 0.01  # clipping happened once: its panel appears
    assert "clipped tokens" in [p.title for p in choose_panels(rows)]
    assert y_range([0.99, 1.0], "fraction") == (-0.02, 1.02)  # a 1% change looks like one
    assert y_range([0.2, 0.9], "reward") == (-0.02, 1.02)
    assert y_range([-2.0, 3.0], "reward") == pytest.approx((-2.25, 3.25))
    lo, hi = y_range([1e-7, -2e-7], "free")
    assert hi - lo >= 0.1 * 2e-7 and y_range([100.0, 100.001], "free")[1] - y_range([100.0, 100.001], "free")[0] >= 10
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"task": None, "train_data": "/data/dbl/train.jsonl",
                                                          "estimator": "grpo", "model": "/m/sft"}))
    assert run_title(tmp_path) == f"train.jsonl, grpo, model /m/sft\n{tmp_path.name}"
