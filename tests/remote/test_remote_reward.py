"""Rewards over HTTP: `reinforcepp serve reward` (a real server on 127.0.0.1) gives the run the
same rewards as the local function, OpenRLHF's protocol both ways (labels filled from the
dataset), retries inside a run, and one-line errors."""

from __future__ import annotations

import httpx
import pytest
import torch

from reinforcepp.lm.trainer import Trainer
from reinforcepp.remote import (
    RemoteError,
    RemoteRewardFunction,
    RemoteSettings,
)
from reinforcepp.cli import main as reinforcepp_main
from reinforcepp.serve.reward import reward_app
from reinforcepp.rewards import (
    RemoteReward,
    RewardError,
    RewardScorer,
    RewardSource,
    load_reward_source,
)
from reinforcepp.rewards.remote import connect_remote_reward
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy
from tests.remote.servers import (
    ScriptedServer,
    ServeProcess,
    ThreadServer,
    free_port,
    send_json,
)

torch.set_num_threads(1)
FAST = RemoteSettings(timeout=10.0, backoff=0.01)


def exact_match(prompts, completions, answer):
    if any(a is None for a in answer):
        raise ValueError("no answer")
    return [float(c == a) for c, a in zip(completions, answer)]


def openrlhf_style(queries, prompts, labels):
    return [float(q[len(p):] == label) for q, p, label in zip(queries, prompts, labels)]


@pytest.fixture(scope="module")
def reward_server():
    server = ThreadServer(reward_app(exact_match, spec="exact_match", token="tok"))
    yield server
    server.stop()


def test_client_and_server_protocol(reward_server):
    fn = RemoteRewardFunction(reward_server.url + "/rewards", RemoteSettings(token="tok", timeout=10.0), batch_size=2)
    assert fn(["1+1=", "2+2=", "3+3="], ["2", "5", "6"], answer=["2", "4", "6"]) == [1.0, 0.0, 1.0]
    info = httpx.get(reward_server.url + "/info", headers={"Authorization": "Bearer tok"}, trust_env=False).json()
    assert info == {"kind": "reward", "protocol": 1, "reward": "exact_match"}
    # A reward function that fails: HTTP 422 naming the reason, then a RewardError naming the URL.
    scorer = RewardScorer([RewardSource("remote", fn)])
    with pytest.raises(RewardError, match="HTTP 422.*no answer"):
        scorer(["p"], ["c"], {"answer": [None]})


def test_server_takes_openrlhf_requests():
    def exact(prompts, completions, labels):
        return [float(c == label) for c, label in zip(completions, labels)]

    server = ThreadServer(reward_app(exact, spec="labels"))
    try:
        body = {"query": ["1+1=2", "2+2=5"], "prompts": ["1+1=", "2+2="], "labels": ["2", "4"]}
        got = httpx.post(server.url + "/rewards", json=body, trust_env=False)
        assert got.status_code == 200 and got.json() == {"rewards": [1.0, 0.0]}
        bad = httpx.post(server.url + "/rewards", json={"query": ["x"], "prompts": ["y"]}, trust_env=False)
        assert bad.status_code == 422 and "must start with its prompt" in bad.json()["error"]
    finally:
        server.stop()


def test_served_openrlhf_function_gets_the_requests_labels():
    from reinforcepp.rewards import from_openrlhf

    server = ThreadServer(reward_app(from_openrlhf(openrlhf_style), spec="openrlhf:openrlhf_style"))
    try:
        body = {"query": ["1+1=2", "2+2=5"], "prompts": ["1+1=", "2+2="], "labels": ["2", "4"]}
        assert httpx.post(server.url + "/rewards", json=body, trust_env=False).json() == {"rewards": [1.0, 0.0]}
    finally:
        server.stop()


def test_openrlhf_server_gets_labels_from_the_dataset():
    def respond(h, n):  # an OpenRLHF-style server: 500 without labels, as such servers do
        body = h.body
        if "labels" not in body or any(label is None for label in body["labels"]):
            send_json(h, 500, {"error": "KeyError: labels"})
        else:
            rewards = openrlhf_style(body["query"], body["prompts"], body["labels"])
            send_json(h, 200, {"rewards": rewards, "scores": [], "extra_logs": {}})

    server = ScriptedServer(respond)
    try:
        fn = RemoteRewardFunction(server.url + "/get_reward", FAST)
        assert fn(["a=", "b="], ["1", "2"], answer=["1", "3"]) == [1.0, 0.0]
        assert fn(["a="], ["1"], label=["1"], answer=["9"]) == [1.0]  # `label` wins over `answer`
        assert server.requests[0][2]["labels"] == ["1", "3"] and server.requests[0][2]["answer"] == ["1", "3"]
        with pytest.raises(RemoteError, match="HTTP 500"):
            fn(["a="], ["1"])  # no label column: labels are nulls, and this server refuses them
    finally:
        server.stop()


def test_run_with_served_reward_equals_local(tmp_path):
    server = ServeProcess("reward", "--reward", "tests.lm.helpers:fraction_of_a", "--port", "0")
    try:
        runs = {}
        for name, reward in (("local", fraction_of_a), ("remote", server.url)):
            tok, model = tiny_policy()
            trainer = Trainer(small_config(tmp_path / name, total_steps=2, remote_batch_size=5), model=model,
                              tokenizer=tok, reward_funcs=[reward], train_dataset=reverse_dataset(64))
            trainer.train()
            runs[name] = [r for r in read_metrics(trainer.run_dir) if r["kind"] == "train"]
    finally:
        server.kill()
    for a, b in zip(runs["local"], runs["remote"]):
        for key in ("reward/mean", "reward/std", "loss/policy", "kl/mean_token", "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key


def test_run_continues_through_503(tmp_path):
    def respond(h, n):
        if h.command == "GET":  # the start-up probe: any answer shows the server is there
            send_json(h, 404, {"error": "no such path"})
        elif len([r for r in server.requests[: n + 1] if r[0] == "POST"]) % 2 == 1:
            send_json(h, 503, {"error": "warming up"}, headers={"Retry-After": "0"})
        else:
            send_json(h, 200, {"rewards": fraction_of_a(h.body["prompts"], h.body["completions"])})

    server = ScriptedServer(respond)
    try:
        tok, model = tiny_policy()
        trainer = Trainer(small_config(tmp_path, total_steps=2, remote_retries=1), model=model, tokenizer=tok,
                          reward_funcs=[server.url + "/score"], train_dataset=reverse_dataset(64))
        trainer.train()
    finally:
        server.stop()
    assert trainer.step == 2
    posts = [r for r in server.requests if r[0] == "POST"]
    assert len(posts) == 4  # every batch was refused once, then scored


def test_unreachable_reward_url_names_the_serve_command():
    port = free_port()
    message = (rf"^reward server http://127.0.0.1:{port}/rewards does not answer; "
               rf"start one with `reinforcepp serve reward --reward SPEC --port {port}`")
    with pytest.raises(RemoteError, match=message):
        connect_remote_reward(f"http://127.0.0.1:{port}/rewards", FAST)


def test_serve_refuses_public_host_without_token(capsys, monkeypatch):
    monkeypatch.delenv("REINFORCEPP_REMOTE_TOKEN", raising=False)
    assert reinforcepp_main(["serve", "reward", "--reward", "tests.lm.helpers:fraction_of_a", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("reinforcepp serve: reward: --host 0.0.0.0 is reachable from other machines: "
                   "give a token with --token-file or REINFORCEPP_REMOTE_TOKEN")
    assert reinforcepp_main(["serve", "reward", "--reward", "tests/missing.py:f"]) == 2
    assert "file 'tests/missing.py' not found" in capsys.readouterr().err
    assert reinforcepp_main(["serve", "reference", "--model", "/no/such/dir"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "reinforcepp serve: reference: --model /no/such/dir: no such model directory"


def test_reward_spec_strings_use_the_shared_client():
    def respond(h, n):
        if n == 0:
            send_json(h, 503, {"error": "busy"})
        elif h.path == "/moved":
            h.send_response(307)
            h.send_header("Location", "/elsewhere")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            send_json(h, 200, {"rewards": [0.5] * len(h.body["completions"])})

    server = ScriptedServer(respond)
    try:
        source = load_reward_source(server.url + "/score")
        assert isinstance(source.fn, RemoteReward) and source.name == server.url + "/score"
        assert RewardScorer([source])(["p", "q"], ["a", "b"], {}).rewards.tolist() == [0.5, 0.5]  # 503, retried
        with pytest.raises(RewardError, match="HTTP 307 redirecting to /elsewhere; redirects are not followed"):
            RemoteReward(server.url + "/moved")(["p"], ["a"])
    finally:
        server.stop()
