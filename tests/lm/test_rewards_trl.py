"""Reward functions written the way TRL, verl and OpenRLHF document them run unchanged; sources
run concurrently, bounded by ``reward_timeout``; extra metrics are logged per source; missing
columns are found at start; process (per-token / per-step) rewards become token rewards."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.config import ConfigError
from reinforcepp.lm.trainer import Trainer
from reinforcepp.rewards import (
    RewardError,
    RewardScorer,
    RewardSource,
    RewardTimeoutError,
    TrainerState,
    from_openrlhf,
    from_verl,
)
from reinforcepp.rewards.process import process_token_rewards, step_end_tokens
from tests.lm.helpers import reverse_dataset, small_config, tiny_policy

torch.set_num_threads(1)
EXACT = {"atol": 1e-6, "rtol": 0}
ROOT = Path(__file__).resolve().parents[2]


# --- TRL's documented reward functions (trl/docs "Using a custom reward function") ----------


def reward_len_ids(completion_ids, **kwargs):
    """TRL docs: a reward that reads token ids."""
    return [-float(abs(20 - len(ids))) for ids in completion_ids]


def math_reward_func(prompts, completions, task, **kwargs):
    """TRL docs, multi-task: return None for the samples this function does not score."""
    return [None if t != "math" else (1.0 if c.strip() == "4" else 0.0) for c, t in zip(completions, task)]


def code_reward_func(prompts, completions, task, **kwargs):
    return [None if t != "code" else (1.0 if "def" in c else 0.0) for c, t in zip(completions, task)]


async def async_reward_func(prompts, completions, **kwargs):
    """TRL docs: an ``async def`` reward (say a call to an API)."""
    await asyncio.sleep(0.01)
    return [float(len(c)) for c in completions]


def format_reward_func(completions, **kwargs):
    """TRL docs, conversational format: reads ``completion[0]["content"]``."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, c) else 0.0 for c in contents]


def curriculum_reward(completions, trainer_state, **kwargs):
    """TRL docs: ``trainer_state`` (``global_step``) for a schedule."""
    scale = min(1.0, trainer_state.global_step / 10)
    return [scale * len(c) for c in completions]


def test_completion_ids_and_trainer_state_are_passed():
    scorer = RewardScorer([RewardSource("len", reward_len_ids), RewardSource("cur", curriculum_reward)])
    ids = [[1] * 18, [2] * 25]
    state = TrainerState(global_step=5, max_steps=20)
    result = scorer(["p", "q"], ["ab", "abc"], {}, completion_ids=ids, trainer_state=state)
    assert_close(result.per_source["len"], torch.tensor([-2.0, -5.0]), **EXACT)
    assert_close(result.per_source["cur"], torch.tensor([1.0, 1.5]), **EXACT)
    assert_close(result.rewards, torch.tensor([-1.0, -3.5]), **EXACT)


def test_none_leaves_a_sample_out_of_that_source_and_unscored_samples_are_dropped():
    scorer = RewardScorer([RewardSource("math", math_reward_func, 2.0), RewardSource("code", code_reward_func, 0.5)])
    result = scorer(["a", "b", "c", "d"], ["4", "def f", "5", "?"], {"task": ["math", "code", "math", "chat"]})
    # sample 0: only math scores (2 * 1); 1: only code (0.5 * 1); 2: math 0; 3: nobody -> dropped
    assert_close(result.rewards, torch.tensor([2.0, 0.5, 0.0, 0.0]), **EXACT)
    assert result.dropped.tolist() == [False, False, False, True]
    assert result.unscored.tolist() == [False, False, False, True]
    assert scorer.unscored_count == 1
    math_vals = result.per_source["math"]
    assert math_vals[1].isnan() and math_vals[3].isnan() and float(math_vals.nanmean()) == 0.5


def test_async_def_reward():
    result = RewardScorer([RewardSource("a", async_reward_func)])(["p", "q"], ["xy", "xyz"], {})
    assert_close(result.rewards, torch.tensor([2.0, 3.0]), **EXACT)


def test_async_def_reward_inside_a_running_event_loop():
    # a notebook runs an event loop; the scorer's own loop lives in a thread of its own
    async def main():
        return RewardScorer([RewardSource("a", async_reward_func)])(["p"], ["xy"], {})

    assert float(asyncio.run(main()).rewards[0]) == 2.0


def test_conversational_prompts_give_message_completions_and_adapters_text():
    seen = {}

    def verl_score(data_source, solution_str, ground_truth, extra_info=None):
        seen["verl"] = solution_str
        return float(solution_str == ground_truth)

    chat = [[{"role": "user", "content": "think"}], [{"role": "user", "content": "go"}]]
    scorer = RewardScorer([RewardSource("fmt", format_reward_func), RewardSource("v", from_verl(verl_score))])
    good = "<think>x</think><answer>4</answer>"
    result = scorer(["<rendered 1>", "<rendered 2>"], [good, "no"], {"answer": [good, "4"]}, chat_prompts=chat)
    assert result.per_source["fmt"].tolist() == [1.0, 0.0]
    assert result.per_source["v"].tolist() == [1.0, 0.0]
    assert seen["verl"] == "no"  # the adapter got the text, not messages

    got = {}

    def echo(prompts, completions, **kwargs):
        got.update(prompts=prompts, completions=completions)
        return [0.0] * len(completions)

    RewardScorer([RewardSource("e", echo)])(["r"], ["hi"], {}, chat_prompts=chat[:1])
    assert got == {"prompts": chat[:1], "completions": [[{"role": "assistant", "content": "hi"}]]}


def test_reward_weights_weigh_each_source(tmp_path):
    tok, model = tiny_policy()
    trainer = Trainer(small_config(tmp_path, total_steps=1, reward_weights=[2.0, -1.0]), model=model, tokenizer=tok,
                      reward_funcs=[async_reward_func, reward_len_ids], train_dataset=reverse_dataset(16))
    r = trainer.rollout()
    lengths = torch.tensor([float(len(ids)) for ids in r.generation.response_ids])
    expected = 2.0 * r.per_source["async_reward_func"] - r.per_source["reward_len_ids"]
    assert_close(r.rewards, expected, **EXACT)
    assert_close(r.per_source["reward_len_ids"], -(20 - lengths).abs(), **EXACT)


# --- concurrency and reward_timeout ------------------------------------------------------------


def test_sources_run_concurrently():
    # each source waits for the other at a barrier: only concurrent calls get past it
    barrier = threading.Barrier(3, timeout=20)

    def a(completions):
        barrier.wait()
        return [1.0] * len(completions)

    async def b(completions):
        barrier.wait()
        return [2.0] * len(completions)

    def c(completions):
        barrier.wait()
        return [4.0] * len(completions)

    result = RewardScorer([RewardSource("a", a), RewardSource("b", b), RewardSource("c", c)])(["p"], ["x"], {})
    assert float(result.rewards[0]) == 7.0


@pytest.mark.parametrize("on_error", ["raise", "drop"])
def test_a_reward_that_never_returns_ends_with_one_line_naming_it(on_error):
    release = threading.Event()

    def stuck(completions):
        release.wait()
        return [0.0] * len(completions)

    sources = [RewardSource("ok", lambda completions: [1.0]), RewardSource("stuck", stuck)]
    scorer = RewardScorer(sources, on_error=on_error, timeout=0.3)
    try:
        message = r"reward source 'stuck' \(.*stuck\) did not return within reward_timeout=0.3 s"
        with pytest.raises(RewardTimeoutError, match=message) as info:
            scorer(["p"], ["x"], {})
        assert "\n" not in str(info.value)
    finally:
        release.set()


def test_reward_timeout_from_the_command_line_is_one_line(tmp_path):
    (tmp_path / "slow.py").write_text("import time\n\ndef forever(completions, **kw):\n    time.sleep(3600)\n")
    cmd = [sys.executable, "-m", "reinforcepp.cli", "train", f"output_dir={tmp_path / 'run'}", "total_steps=1",
           "sft_steps=0", "prompts_per_step=2", "samples_per_prompt=2", "eval_every=0", "progress=false",
           "tensorboard=false", f"reward_funcs={tmp_path / 'slow.py'}:forever", "reward_timeout=1"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT, env=env)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "reward source 'forever'" in last and "reward_timeout=1 s" in last
    assert "Traceback" not in out.stderr


# --- extra metrics per source (verl dict keys, OpenRLHF extra_logs) ------------------------------


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl docs: a dict return with ``score`` and more keys."""
    acc = solution_str.strip() == ground_truth
    return {"score": 1.0 if acc else -0.5, "acc": acc}


def reward_func(queries, prompts, labels):
    """OpenRLHF docs: a dict with rewards, scores and extra_logs."""
    rewards = torch.tensor([float(q.endswith(label)) for q, label in zip(queries, labels)])
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"dummy_scores": rewards * 3}}


def test_verl_and_openrlhf_extra_metrics_are_reported_per_source():
    scorer = RewardScorer([RewardSource("compute_score", from_verl(compute_score)),
                           RewardSource("reward_func", from_openrlhf(reward_func))])
    result = scorer(["1+1=", "2+2="], ["2", "5"], {"answer": ["2", "4"]})
    assert_close(result.per_source["compute_score"], torch.tensor([1.0, -0.5]), **EXACT)
    assert result.extras == {"compute_score/acc": 0.5, "reward_func/dummy_scores": 1.5}


def test_extra_metrics_reach_the_run_log(tmp_path):
    tok, model = tiny_policy()
    trainer = Trainer(small_config(tmp_path, total_steps=1), model=model, tokenizer=tok,
                      reward_funcs=[RewardSource("compute_score", from_verl(compute_score))],
                      train_dataset=reverse_dataset(16))
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"][-1]
    assert 0.0 <= train["reward/compute_score/acc"] <= 1.0
    assert train["reward/unscored_samples"] == 0.0


# --- a reward needing a column the dataset lacks: found at start -------------------------------


def needs_solution(completions, solution, **kwargs):
    return [float(c == s) for c, s in zip(completions, solution)]


def test_missing_column_is_found_at_start(tmp_path):
    tok, model = tiny_policy()
    message = (r"reward source 'needs_solution' .* needs argument 'solution', which is not a column of the dataset "
               r"\(columns: answer, demonstration\)")
    with pytest.raises(ConfigError, match=message):
        Trainer(small_config(tmp_path), model=model, tokenizer=tok, reward_funcs=[needs_solution],
                train_dataset=reverse_dataset(16))
    with pytest.raises(ConfigError, match=r"needs argument .ground_truth.*columns: demonstration\)"):
        Trainer(small_config(tmp_path), model=model, tokenizer=tok,
                reward_funcs=[from_verl(compute_score, ground_truth_column="gt")],
                train_dataset=reverse_dataset(16).remove_columns("answer"))


# --- process rewards ----------------------------------------------------------------------------


def test_step_ends_map_to_tokens():
    # one character per token: "ab\n\ncd\n\ne" -> steps "ab\n\n" (tokens 0-3), "cd\n\n" (4-7), "e" (8)
    text = "ab\n\ncd\n\ne"
    ids = list(range(len(text)))

    def decode(prefix):
        return text[: len(prefix)]

    assert step_end_tokens(text, ids, decode, "\n\n") == [3, 7, 8]
    assert process_token_rewards([1.0, -1.0, 0.5], text, ids, decode, "\n\n", "r") == [0, 0, 0, 1.0, 0, 0, 0, -1.0, 0.5]
    # a trailing delimiter does not open an empty step
    assert step_end_tokens("ab\n\n", [0, 1, 2, 3], lambda p: "ab\n\n"[: len(p)], "\n\n") == [3]
    with pytest.raises(RewardError, match=r"'r' returned 2 step rewards for a completion of 3 steps"):
        process_token_rewards([1.0, 2.0], text, ids, decode, "\n\n", "'r'")
    with pytest.raises(RewardError, match=r"returned 2 per-token rewards for a completion of 9 tokens"):
        process_token_rewards([1.0, 2.0], text, ids, decode, None, "r")


def test_per_token_rewards_become_token_rewards(tmp_path):
    def per_token(completion_ids, **kwargs):  # 0.1 on every token
        return [[0.1] * len(ids) for ids in completion_ids]

    def final(completions, **kwargs):
        return [1.0] * len(completions)

    tok, model = tiny_policy()
    config = small_config(tmp_path, kl_placement="none", estimator="reinforce", reward_weights=[2.0, 1.0])
    trainer = Trainer(config, model=model, tokenizer=tok, reward_funcs=[per_token, final],
                      train_dataset=reverse_dataset(16))
    rollout = trainer.rollout()
    exp = trainer.make_experience(rollout)
    lengths = exp.response_mask.sum(1)
    # reinforce: A = G = sum_{s >= t} r_s; at t = 0: 2 * 0.1 * length + 1
    assert_close(exp.advantages[:, 0], 0.2 * lengths + 1.0, atol=1e-5, rtol=0)
    assert_close(rollout.per_source["per_token"], 0.1 * lengths, atol=1e-5, rtol=0)
    assert_close(rollout.rewards, torch.ones(len(lengths)), **EXACT)  # process rewards add nothing to R


def test_process_rewards_are_refused_by_broadcasting_estimators(tmp_path):
    tok, model = tiny_policy()
    trainer = Trainer(small_config(tmp_path, estimator="grpo"), model=model, tokenizer=tok,
                      reward_funcs=[lambda completion_ids, **kw: [[0.0] * len(i) for i in completion_ids]],
                      train_dataset=reverse_dataset(16))
    with pytest.raises(ConfigError, match="broadcasts one advantage per response"):
        trainer.rollout()


def with_alarm(completions, **kwargs):
    """A verifier with a signal-based timeout (as math-verify's parse/verify): main thread only."""
    import signal

    old = signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, old)
    return [1.0] * len(completions)


def test_a_reward_that_sets_a_signal_handler_runs_in_the_main_thread(caplog):
    scorer = RewardScorer([RewardSource("alarm", with_alarm),
                           RewardSource("other", lambda completions: [2.0] * len(completions))])
    with caplog.at_level("WARNING"):
        result = scorer(["p"], ["x"], {})
    assert float(result.rewards[0]) == 3.0
    assert "works only in the main thread" in caplog.text
    assert float(scorer(["p"], ["x"], {}).rewards[0]) == 3.0  # from then on called there directly
