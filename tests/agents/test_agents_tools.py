"""Tool calling: parsers, the tool environment, errors and timeouts, the chat-template format."""

import asyncio
import time

import pytest

from reinforcepp.agents import (
    ChatFormat,
    JSONToolParser,
    TagToolParser,
    ToolCall,
    ToolEnv,
)
from reinforcepp.agents.protocol import EnvError, check_step


def step(env, text):
    out = env.step(text)
    return asyncio.run(out) if asyncio.iscoroutine(out) else out


def add(a: int, b: int) -> int:
    return a + b


def test_tag_parser_positional_and_json_arguments():
    p = TagToolParser()
    assert p.parse("the answer is 5") is None
    assert p.parse("x <tool>add 12 30</tool> y") == ToolCall("add", ("12", "30"))
    assert p.parse('<tool>add {"a": 1, "b": 2}</tool>') == ToolCall("add", (), {"a": 1, "b": 2})
    assert p.format_result("42") == "<result>42</result>"


def test_json_parser_hermes_format():
    p = JSONToolParser()
    call = p.parse('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    assert call == ToolCall("add", (), {"a": 1, "b": 2})
    assert p.parse("no call") is None


def test_tool_env_runs_the_tool_and_ends_on_an_answer():
    env = ToolEnv([add], reward_fn=lambda row, answer: float(answer.strip() == row["answer"]))
    env.reset({"prompt": "2+3=", "answer": "5"})
    counts = {"tool_calls": 1.0, "tool_errors": 0.0, "tool_timeouts": 0.0}
    assert step(env, "<tool>add 2 3</tool>") == ("<result>5</result>", 0.0, False, counts)
    _obs, reward, done, info = step(env, "5")
    assert (reward, done, info["tool_calls"]) == (1.0, True, 0.0)


def test_async_tool():
    async def lookup(key: str) -> str:
        await asyncio.sleep(0)
        return {"x": "7"}[key]

    env = ToolEnv({"lookup": lookup}, parser=JSONToolParser())
    env.reset({})
    assert step(env, '<tool_call>{"name": "lookup", "arguments": {"key": "x"}}</tool_call>')[0] == "7"


@pytest.mark.parametrize("text, message", [
    ("<tool>div 1 0</tool>", "error: div raised ZeroDivisionError: division by zero"),
    ("<tool>mul 1 2</tool>", "error: unknown tool 'mul'; tools: add, div"),
    ("<tool>add x 2</tool>", "error: bad arguments for add: invalid literal for int() with base 10: 'x'"),
    ('<tool>add {"a": 1</tool>', "error: bad tool call: arguments are not valid JSON"),
])
def test_tool_errors_go_back_to_the_model_and_are_counted(text, message):
    def div(a: int, b: int) -> float:
        return a / b

    env = ToolEnv([add, div])
    env.reset({})
    obs, reward, done, info = check_step(env, 1, step(env, text)).__dict__.values()
    assert obs.startswith("<result>" + message) and not done and reward == 0.0
    assert info == {"tool_calls": 1.0, "tool_errors": 1.0, "tool_timeouts": 0.0}


def test_tool_timeout_goes_back_to_the_model_and_is_counted():
    def slow(x: int) -> int:
        time.sleep(30)
        return x

    env = ToolEnv([slow], timeout=0.05)
    env.reset({})
    obs, _reward, done, info = step(env, "<tool>slow 1</tool>")
    assert obs == "<result>error: slow timed out after 0.05 s</result>" and not done
    assert info == {"tool_calls": 1.0, "tool_errors": 0.0, "tool_timeouts": 1.0}


@pytest.mark.parametrize("out, message", [
    ((1, 0.0, False), "environment Env, turn 3: the observation is a int, expected str"),
    (("x", float("nan"), True), "environment Env, turn 3: the reward is nan, expected a finite number"),
    (("x", "1", True), "environment Env, turn 3: the reward is '1', expected a finite number"),
    (("x", 1.0), "environment Env, turn 3: step() must return (observation, reward, done[, info])"),
])
def test_bad_step_outputs_name_the_environment_and_turn(out, message):
    class Env:
        pass

    with pytest.raises(EnvError) as e:
        check_step(Env(), 3, out)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_chat_format_renders_the_observation_as_the_template_does():
    from reinforcepp.lm.tasks import build_char_tokenizer

    tok = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789:<>/ ")
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fmt = ChatFormat(tok)
    ids = fmt.observation_ids("42", "tool")
    # after the model's own EOS: the space the template puts after it, the tool message, the next assistant header
    assert tok.decode(ids) == " <tool>42<eos> <assistant>"
    messages = [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "call"}, {"role": "tool", "content": "42"}
    ]
    full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert full == prefix + "call" + tok.eos_token + tok.decode(ids)


def test_cli_bad_environment_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    env_file = tmp_path / "my_env.py"
    env_file.write_text(
        "class Broken:\n"
        "    def reset(self, row):\n        return None\n"
        "    def step(self, text):\n        return ['not', 'a', 'string'], 0.0, False\n"
    )
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join('{"prompt": "rev abc="}\n' for _ in range(8)))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "reinforcepp.cli", "train", f"environment={env_file}:Broken", f"train_data={data}",
         "sft_steps=0", "total_steps=1", "prompts_per_step=2", "samples_per_prompt=2", "max_new_tokens=3",
         "eval_every=0", "progress=false", "tensorboard=false", f"output_dir={tmp_path / 'run'}", "micro_batch_size=4"],
        check=False, capture_output=True, text=True, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300,
    )
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("reinforcepp train: environment")]
    assert lines == ["reinforcepp train: environment Broken, turn 1: the observation is a list, expected str"]
    assert "Traceback" not in out.stderr


def test_worked_example_kv_env():
    import json
    from pathlib import Path

    from reinforcepp.agents import load_environment

    root = Path(__file__).resolve().parents[2] / "examples" / "tool_env"
    make_env = load_environment(f"{root / 'kv_env.py'}:make_env")
    row = json.loads((root / "kv.jsonl").read_text().splitlines()[0])
    key = row["prompt"].split("key ")[1].split("?")[0]
    env = make_env()
    assert env.reset(row) is None
    assert step(env, f"<tool>get {key}</tool>")[0] == f"<result>{row['answer']}</result>"
    assert step(env, "<tool>get nokey</tool>")[0] == "<result>error: get raised KeyError: 'nokey'</result>"
    assert step(env, row["answer"])[1:3] == (1.0, True)
