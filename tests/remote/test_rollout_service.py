"""Rollout servers (`reinforcepp serve rollout`, real servers on 127.0.0.1) and `engine=remote`:
two servers give the local engine's greedy output and seeded samples; after an update their
log-probs equal the trainer's; a stale server is never used; a server killed mid-run leaves the
run to the other; both killed stop the run with the resume command, and the resumed run equals the
uninterrupted one; asynchronous rollouts through servers equal the local ones; bad input is one
line naming the server."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest
import torch

from reinforcepp.cli import main as reinforcepp_main
from reinforcepp.engines import SamplingParams, SharedPromptSampler
from reinforcepp.engines.remote import RemoteEngine
from reinforcepp.lm.batch import collate
from reinforcepp.lm.config import LMConfig
from reinforcepp.lm.logprobs import response_logprobs
from reinforcepp.lm.trainer import Trainer
from reinforcepp.remote.weights import PieceWriter, chunks_of
from reinforcepp.run import read_metrics
from reinforcepp.serve.rollout import hf_backend, rollout_app
from tests.lm.helpers import fraction_of_a, logprob_gap, reverse_dataset, small_config, tiny_policy
from tests.remote.servers import ScriptedServer, ServeProcess, ThreadServer, free_port, send_json

torch.set_num_threads(1)
PROMPTS = ("rev abc=", "rev hgfed=", "rev ba=", "rev cab=", "rev ddcb=", "rev e=")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model the servers start with: other weights than the trainer's (tiny_policy(), seed 0),
    so nothing below passes unless the trainer's weights were pushed."""
    path = tmp_path_factory.mktemp("served")
    tok, model = tiny_policy(seed=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _serve(model_dir: str, *extra: str) -> ServeProcess:
    # a small request limit: a push of the tiny model (97 KB) travels in two chunks
    return ServeProcess("rollout", "--model", model_dir, "--port", "0", "--max-request-mb", "0.1", *extra)


@pytest.fixture(scope="module")
def two(model_dir):
    servers = [_serve(model_dir), _serve(model_dir)]
    yield servers
    for s in servers:
        s.kill()


def _engine(urls, model, tok, **overrides) -> RemoteEngine:
    cfg = LMConfig.from_dict({"rollout_urls": list(urls), **overrides})
    return RemoteEngine(model, tok, config=cfg)


def _ids(tok, prompts=PROMPTS):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def _info(url):
    return httpx.get(url + "/info", trust_env=False).json()


def test_two_servers_give_the_local_engines_greedy_output_and_seeded_samples(two):
    tok, model = tiny_policy()
    engine = _engine([s.url for s in two], model, tok)
    engine.sync_weights(model, version=0)
    local = SharedPromptSampler(model, tok)
    for params in (
        SamplingParams(8, greedy=True),
        SamplingParams(8, temperature=0.9, top_k=20, seed=11),
        SamplingParams(8, seed=12),
    ):
        ours, theirs = engine.generate(_ids(tok), 3, params), local.generate(_ids(tok), 3, params)
        assert ours.response_ids == theirs.response_ids and ours.prompt_ids == theirs.prompt_ids
        assert ours.truncated.tolist() == theirs.truncated.tolist()
        for a, b in zip(ours.sampler_logprobs, theirs.sampler_logprobs):
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
        assert ours.token_versions == [[0] * len(r) for r in ours.response_ids]
    assert all(s.served_parts > 0 for s in engine.pool.servers)  # the calls were split over both
    # the seeds are the call's, whatever the split: one prompt alone gets its samples of the whole call
    params = SamplingParams(8, seed=12)
    alone = engine.generate(_ids(tok)[2:3], 3, SamplingParams(8, prompt_seeds=tuple(params.seeds_for(6)[2:3])))
    assert alone.response_ids == local.generate(_ids(tok), 3, params).response_ids[6:9]
    engine.close()


def test_logprobs_after_an_update_equal_the_trainers(two):
    tok, model = tiny_policy()
    engine = _engine([s.url for s in two], model, tok)
    engine.sync_weights(model, version=0)
    before = engine.generate(_ids(tok), 2, SamplingParams(6, seed=3))
    b = collate(before.prompt_ids, before.response_ids, tok.pad_token_id)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lp = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length).logprobs
    (-(lp * b.response_mask).sum()).backward()
    opt.step()

    stale = engine.generate(_ids(tok), 2, SamplingParams(6, temperature=0.8, seed=4))
    assert logprob_gap(model, tok, stale, 0.8) > 1e-2  # not pushed yet
    engine.sync_weights(model, version=1)
    fresh = engine.generate(_ids(tok), 2, SamplingParams(6, temperature=0.8, seed=4))
    assert logprob_gap(model, tok, fresh, 0.8) < 1e-4 and {v for row in fresh.token_versions for v in row} == {1}
    assert all(_info(s.url)["versions"][-2:] == [0, 1] for s in two)
    engine.close()


def test_a_version_the_server_does_not_hold_is_refused_with_409(two):
    url = two[0].url
    info = _info(url)
    body = {
        "prompt_ids": [[5, 6]],
        "samples_per_prompt": 1,
        "max_new_tokens": 2,
        "run": info["run"],
        "weight_version": 99,
    }
    answer = httpx.post(url + "/generate", json=body, trust_env=False)
    assert (
        answer.status_code == 409
        and answer.json()["versions"] == info["versions"]
        and "not version 99" in answer.json()["error"]
    )
    other = httpx.post(url + "/generate", json={**body, "run": "another-run", "weight_version": 0}, trust_env=False)
    assert other.status_code == 409 and other.json()["versions"] == []


def test_a_stale_server_is_never_used_and_comes_back_with_the_next_push(model_dir, two, tmp_path):
    """Server A restarts between a push and the next generation (so it holds only the weights it
    started with): its part is refused (409) and sent to B; the next push gives A the new version
    and A serves again."""
    a = _serve(model_dir)
    b = two[1]
    tok, model = tiny_policy()
    engine = _engine([a.url, b.url], model, tok)
    engine.sync_weights(model, version=0)
    a.kill()
    a = ServeProcess("rollout", "--model", model_dir, "--port", str(a.port), "--max-request-mb", "0.1")
    try:
        served_b = sum(_info(b.url)["served"].values())
        params = SamplingParams(8, seed=21)
        got = engine.generate(_ids(tok), 2, params)
        assert got.response_ids == SharedPromptSampler(model, tok).generate(_ids(tok), 2, params).response_ids
        assert _info(a.url)["served"] == {}  # the stale server sampled nothing
        assert sum(_info(b.url)["served"].values()) == served_b + 12 and engine.pool.failovers >= 1
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        engine.sync_weights(model, version=1)  # A takes part in the push: back in the pool
        engine.generate(_ids(tok), 2, SamplingParams(8, seed=22))
        assert set(_info(a.url)["served"]) == {"1"} and _info(a.url)["run"] == engine.pool.run
    finally:
        a.kill()
        engine.close()


def test_a_request_on_a_dead_server_goes_to_the_other(model_dir, two):
    a, b = _serve(model_dir), two[1]
    tok, model = tiny_policy()
    engine = _engine([a.url, b.url], model, tok)
    engine.sync_weights(model, version=0)
    a.kill()  # after the push, unnoticed until a part is sent to it
    params = SamplingParams(8, seed=31)
    got = engine.generate(_ids(tok), 2, params)
    assert got.response_ids == SharedPromptSampler(model, tok).generate(_ids(tok), 2, params).response_ids
    dead = engine.pool.servers[0]
    assert not dead.alive and "could not be reached" in dead.reason and engine.pool.failovers >= 1
    engine.close()


def test_a_server_killed_mid_run_leaves_the_run_to_the_other_and_comes_back(model_dir, tmp_path):
    """Server A dies after step 2's rollout (the push of version 2 leaves it out), is restarted
    during step 3 and takes part again from the push of version 3 on; the run never stops."""
    servers = [_serve(model_dir), _serve(model_dir)]
    calls = []

    def reward_that_kills_and_restarts_a_server(prompts, completions, **_):
        calls.append(1)
        if len(calls) == 2:
            servers[0].kill()
        if len(calls) == 3:
            servers[0] = ServeProcess("rollout", "--model", model_dir, "--port", str(servers[0].port))
        return fraction_of_a(prompts, completions)

    tok, model = tiny_policy()
    try:
        cfg = small_config(tmp_path, total_steps=4, rollout_urls=[s.url for s in servers], remote_retries=1)
        trainer = Trainer(
            cfg,
            model=model,
            tokenizer=tok,
            reward_funcs=[reward_that_kills_and_restarts_a_server],
            train_dataset=reverse_dataset(64),
        )
        trainer.train()
        assert [r["step"] for r in read_metrics(trainer.run_dir) if r["kind"] == "train"] == [1, 2, 3, 4]
        assert all(s.alive for s in trainer.engine.pool.servers)
        assert set(_info(servers[1].url)["served"]) == {"0", "1", "2", "3"}  # step 3 (version 2) on the survivor alone
        assert set(_info(servers[0].url)["served"]) == {"3"}  # back for step 4, with the weights pushed to it
    finally:
        for s in servers:
            s.kill()


# ------------------------------------------------------------------ resume through the command line
REWARD_FILE = """
import os, signal
calls = []
def reward(prompts, completions, **_):
    calls.append(1)
    if len(calls) == int(os.environ.get("KILL_AT_CALL", "0")):
        for pid in os.environ["KILL_PIDS"].split(","):
            os.kill(int(pid), signal.SIGKILL)
    return [c.count("a") / max(1, len(c)) for c in completions]
"""


def _cli(capsys, *items, resume=False):
    code = reinforcepp_main(
        [
            "train",
            *(["--resume"] if resume else []),
            "sft_steps=0",
            "progress=false",
            "tensorboard=false",
            "eval_every=0",
            "remote_retries=1",
            *items,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def _run_items(tmp_path, run, model_dir, urls):
    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        reverse_dataset(64).to_json(str(data))
        (tmp_path / "kill_reward.py").write_text(REWARD_FILE)
    return [
        f"output_dir={run}",
        f"model={model_dir}",
        f"train_data={data}",
        f"reward_funcs={tmp_path / 'kill_reward.py'}:reward",
        f"rollout_urls={','.join(urls)}",
        "total_steps=4",
        "save_every=1",
        "prompts_per_step=4",
        "samples_per_prompt=4",
        "micro_batch_size=8",
        "max_new_tokens=4",
        "lr=1e-2",
        "torch_threads=1",
    ]


def test_no_server_left_stops_the_run_with_the_resume_command_and_resume_equals_uninterrupted(
    model_dir, tmp_path, capsys, monkeypatch
):
    tok, model = tiny_policy()
    trainer_dir = tmp_path / "policy"
    model.save_pretrained(trainer_dir)
    tok.save_pretrained(trainer_dir)
    servers = [_serve(model_dir), _serve(model_dir)]
    urls = [s.url for s in servers]

    def fresh_reward_module():
        import sys

        for name in [n for n in sys.modules if n.startswith("_reinforcepp_reward_kill_reward")]:
            del sys.modules[name]  # its call count starts again

    try:
        assert _cli(capsys, *_run_items(tmp_path, tmp_path / "full", trainer_dir, urls))[0] == 0
        monkeypatch.setenv("KILL_PIDS", ",".join(str(s.proc.pid) for s in servers))
        monkeypatch.setenv("KILL_AT_CALL", "3")  # step 3 is scored, then both servers die: the push of version 3 fails
        fresh_reward_module()
        code, line = _cli(capsys, *_run_items(tmp_path, tmp_path / "cut", trainer_dir, urls))
        assert code == 1
        assert line.startswith("reinforcepp train: step 3: no rollout server left to take weight version 3: "), line
        assert line.endswith(
            f"the last checkpoint ({tmp_path / 'cut' / 'checkpoints' / 'step_00000002'}) is intact: once the server is "
            f"back, continue with `reinforcepp train --resume output_dir={tmp_path / 'cut'} model={trainer_dir} "
            f"reward_funcs={tmp_path / 'kill_reward.py'}:reward rollout_urls={','.join(urls)}`"
        ), line
        for s in servers:
            s.kill()
        servers = [ServeProcess("rollout", "--model", model_dir, "--port", str(s.port)) for s in servers]
        monkeypatch.setenv("KILL_AT_CALL", "0")
        fresh_reward_module()
        assert _cli(capsys, *_run_items(tmp_path, tmp_path / "cut", trainer_dir, urls), resume=True)[0] == 0
    finally:
        for s in servers:
            s.kill()
    full, cut = ([r for r in read_metrics(tmp_path / name) if r["kind"] == "train"] for name in ("full", "cut"))
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(full, cut):
        for key in ("reward/mean", "response/length_mean", "loss/policy", "kl/mean_token"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key


# ------------------------------------------------------------------ asynchronous rollouts
@pytest.mark.parametrize("settings",
                         [dict(async_rollouts=1), dict(async_rollouts=2, partial_rollouts=True, max_new_tokens=6)],
                         ids=["n1", "n2-partial"])
def test_async_rollouts_through_two_servers_equal_the_local_producer(two, tmp_path, settings):
    """The producer stages every version on the servers at publish time (no snapshot of its own)
    and asks for the version its schedule gives (with partial rollouts, a newer one per segment);
    the samples (per-prompt seeds) and so the run equal the local asynchronous run's."""
    runs = {}
    for name, extra in (("local", {}), ("remote", {"rollout_urls": [s.url for s in two]})):
        tok, model = tiny_policy()
        t = Trainer(
            small_config(tmp_path / name, total_steps=4, **settings, **extra),
            model=model,
            tokenizer=tok,
            reward_funcs=[fraction_of_a],
            train_dataset=reverse_dataset(64),
        )
        t.train()
        runs[name] = (t, [r for r in read_metrics(t.run_dir) if r["kind"] == "train"])
    remote, rows = runs["remote"]
    assert all(snapshot == [] for snapshot in remote.producer.published.values())  # the servers hold the versions
    n = settings["async_rollouts"]
    assert [r["staleness/sequence_max"] for r in rows] == [float(min(s - 1, n)) for s in range(1, 5)]
    for a, b in zip(runs["local"][1], rows):
        assert a["reward/mean"] == b["reward/mean"] and b["loss/policy"] == pytest.approx(a["loss/policy"], abs=1e-5)
        assert a.get("staleness/mixed_sequence_fraction") == b.get("staleness/mixed_sequence_fraction")
    for pa, pb in zip(runs["local"][0].policy.parameters(), remote.policy.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=0)
    served = [_info(s.url)["served"] for s in two]
    assert all({"0", "1"} <= set(x) for x in served)


# ------------------------------------------------------------------ the server's checks
def _push(url, run, version, pieces, chunk_bytes, *, corrupt=None):
    digest, size, index = hashlib.sha256(), 0, 0
    for piece in pieces:
        for chunk, end in chunks_of(piece, chunk_bytes):
            sent = corrupt(index, chunk) if corrupt else chunk
            r = httpx.post(
                url + "/weights",
                content=sent,
                params={
                    "run": run,
                    "version": version,
                    "chunk": index,
                    "end": int(end),
                    "sha256": hashlib.sha256(chunk).hexdigest(),
                },
                trust_env=False,
            )
            if r.status_code != 200:
                return r
            digest.update(chunk)
            size += len(chunk)
            index += 1
    return httpx.post(
        url + "/weights/commit",
        json={"run": run, "version": version, "chunks": index, "bytes": size, "sha256": digest.hexdigest()},
        trust_env=False,
    )


def _pieces(named, piece_bytes=20_000):
    writer, out = PieceWriter(piece_bytes), []
    for name, t in named:
        piece = writer.add(name, t)
        if piece is not None:
            out.append(piece)
    out.append(writer.flush())
    return out


@pytest.fixture(scope="module")
def in_process():
    tok, model = tiny_policy(seed=2)
    server = ThreadServer(
        rollout_app(
            hf_backend(model.eval(), tok, torch.device("cpu")),
            tok,
            model_name="t",
            eos_token_ids=[tok.eos_token_id],
            keep_versions=2,
            max_request_bytes=50_000,
        )
    )
    yield server, model
    server.stop()


def test_a_push_in_pieces_and_chunks_is_checked_and_versions_are_kept_as_asked(in_process):
    server, model = in_process
    url = server.url
    tok, policy = tiny_policy()
    named = list(policy.state_dict().items())
    pieces = _pieces(named)
    assert len(pieces) > 3
    ok = _push(url, "r1", 1, pieces, 8_000)
    assert ok.status_code == 200 and ok.json() == {"run": "r1", "versions": [1], "weight_version": None}
    assert _push(url, "r1", 2, pieces, 8_000).json()["versions"] == [1, 2]
    assert _push(url, "r1", 3, pieces, 8_000).json()["versions"] == [2, 3]  # keep_versions=2
    alias = httpx.post(url + "/weights/commit", json={"run": "r1", "version": 4, "same_as": 3}, trust_env=False)
    assert alias.json()["versions"] == [3, 4]
    # a request activates the held version: the server's model now holds the pushed weights
    body = {
        "prompt_ids": [[5, 6, 7]],
        "samples_per_prompt": 2,
        "max_new_tokens": 3,
        "greedy": True,
        "run": "r1",
        "weight_version": 4,
    }
    assert httpx.post(url + "/generate", json=body, trust_env=False).status_code == 200
    mine = model.state_dict()
    for name, t in named:
        torch.testing.assert_close(mine[name], t, atol=0, rtol=0)
    # a resumed run re-pushing version 3 drops the versions above it, the active one too
    assert _push(url, "r1", 3, pieces, 8_000).json() == {"run": "r1", "versions": [3], "weight_version": None}

    def flip(i, chunk):
        return chunk[:-1] + bytes([chunk[-1] ^ 1]) if i == 2 else chunk

    bad = _push(url, "r1", 5, pieces, 8_000, corrupt=flip)
    assert bad.status_code == 422 and "chunk 2 of weight version 5: its sha256 does not match" in bad.json()["error"]
    skipped = httpx.post(
        url + "/weights",
        content=b"x",
        params={"run": "r1", "version": 5, "chunk": 7, "end": 1, "sha256": hashlib.sha256(b"x").hexdigest()},
        trust_env=False,
    )
    assert skipped.status_code == 422 and "expected chunk 0" in skipped.json()["error"]
    drop = next(i for i, (n, _) in enumerate(named) if ".mlp." in n)
    missing = _push(url, "r1", 5, _pieces(named[:drop] + named[drop + 1 :]), 8_000)
    assert missing.status_code == 422 and f"lacks weight {named[drop][0]!r}" in missing.json()["error"]
    wrong = _push(url, "r1", 5, _pieces([("model.not_a_weight", torch.zeros(2))]), 8_000)
    assert wrong.status_code == 422 and "'model.not_a_weight' is not a weight" in wrong.json()["error"]
    shape = _push(url, "r1", 5, _pieces([(named[0][0], torch.zeros(3, 3))]), 8_000)
    assert shape.status_code == 422 and "has shape [3, 3]" in shape.json()["error"]
    junk = httpx.post(
        url + "/weights",
        content=b"not safetensors",
        params={
            "run": "r1",
            "version": 5,
            "chunk": 0,
            "end": 1,
            "sha256": hashlib.sha256(b"not safetensors").hexdigest(),
        },
        trust_env=False,
    )
    assert junk.status_code == 422 and "not a safetensors file" in junk.json()["error"]
    assert _info(url)["versions"] == [3]  # nothing of the refused pushes was kept


def test_the_server_refuses_bad_requests(in_process):
    server, _ = in_process
    url = server.url + "/generate"
    info = _info(server.url)
    good = {
        "prompt_ids": [[5, 6]],
        "samples_per_prompt": 1,
        "max_new_tokens": 2,
        "run": info["run"],
        "weight_version": info["versions"][-1],
    }
    for change, message in (
        ({"prompt_ids": [[5, 99]]}, "not a token id in [0, 48)"),
        ({"prompt_ids": [[]]}, "none empty"),
        ({"samples_per_prompt": 0}, "must be integers >= 1"),
        ({"temperature": 0}, "temperature must be"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"seeds": [1, 2]}, "seeds must be null or 1 integers"),
        ({"run": None}, "needs 'run'"),
    ):
        r = httpx.post(url, json={**good, **change}, trust_env=False)
        assert r.status_code == 422 and message in r.json()["error"], (change, r.text)
    assert (
        httpx.post(url, content=json.dumps({**good, "prompt_ids": [[5] * 30_000]}), trust_env=False).status_code == 413
    )


# ------------------------------------------------------------------ bad input, one line naming the server
def test_bad_servers_are_refused_at_start_in_one_line(tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    monkeypatch.delenv("REINFORCEPP_REMOTE_TOKEN", raising=False)
    items = ["total_steps=1", "prompts_per_step=4", "samples_per_prompt=2", "max_new_tokens=4"]
    dead = f"http://127.0.0.1:{free_port()}"
    code, line = _cli(capsys, f"output_dir={tmp_path / 'a'}", f"rollout_urls={dead}", *items)
    assert (
        code == 2
        and line
        == f"reinforcepp train: rollout server {dead} does not answer; "
        "start one with `reinforcepp serve rollout --model MODEL --port PORT`"
    )

    code, line = _cli(capsys, f"output_dir={tmp_path / 'b'}", "rollout_urls=http://10.1.2.3:8000", *items)
    assert code == 2 and line.startswith(
        "reinforcepp train: rollout server http://10.1.2.3:8000 is on another machine and needs a token"
    )

    code, line = _cli(capsys, f"output_dir={tmp_path / 'c'}", f"rollout_urls={dead}", "engine=vllm", *items)
    assert code == 2 and line.startswith(
        "reinforcepp train: rollout_urls sends generation to rollout servers (engine=remote), but engine=vllm"
    )

    tok, _ = tiny_policy()
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=60,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    vocab = tok.get_vocab()
    swapped = {t: (i if i < 4 else 4 + (len(vocab) - 1 - i)) for t, i in vocab.items()}  # same size, other ids
    other_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=swapped, unk_token="<unk>")))
    _, same_size = tiny_policy()
    for model, tokenizer, expected in (
        (other, None, "has vocab size 60, the policy "),
        (same_size, other_tok, "uses another tokenizer (hash "),
    ):
        server = ThreadServer(
            rollout_app(
                hf_backend(model.eval(), tokenizer, torch.device("cpu")), tokenizer, model_name="x", eos_token_ids=[2]
            )
        )
        try:
            code, line = _cli(capsys, f"output_dir={tmp_path / expected[:4]}", f"rollout_urls={server.url}", *items)
        finally:
            server.stop()
        assert code == 2 and line.startswith(f"reinforcepp train: rollout server {server.url} {expected}"), line


def _small_run(tmp_path, model_dir):
    data = tmp_path / "prompts.jsonl"
    reverse_dataset(16).to_json(str(data))
    return [
        f"model={model_dir}",
        f"train_data={data}",
        "reward_funcs=tests.lm.helpers:fraction_of_a",
        "total_steps=1",
        "prompts_per_step=4",
        "samples_per_prompt=2",
        "max_new_tokens=4",
        "micro_batch_size=8",
        "torch_threads=1",
    ]


def test_a_wrong_or_missing_token_gets_401(model_dir, tmp_path, capsys, monkeypatch):
    tok, model = tiny_policy()
    server = ThreadServer(
        rollout_app(
            hf_backend(model.eval(), tok, torch.device("cpu")),
            tok,
            model_name="guarded",
            eos_token_ids=[2],
            token="s3cret",
        )
    )
    items = [f"rollout_urls={server.url}", *_small_run(tmp_path, model_dir)]
    try:
        monkeypatch.delenv("REINFORCEPP_REMOTE_TOKEN", raising=False)
        code, line = _cli(capsys, f"output_dir={tmp_path / 'a'}", *items)
        assert code == 2 and line.startswith(
            f"reinforcepp train: rollout server {server.url}/info answered HTTP 401 (unauthorized)"
        )
        monkeypatch.setenv("REINFORCEPP_REMOTE_TOKEN", "wrong")
        code, line = _cli(capsys, f"output_dir={tmp_path / 'b'}", *items)
        assert code == 2 and "HTTP 401" in line
        assert httpx.post(server.url + "/weights/commit", json={}, trust_env=False).status_code == 401
        assert httpx.post(server.url + "/generate", json={}, trust_env=False).status_code == 401
        monkeypatch.setenv("REINFORCEPP_REMOTE_TOKEN", "s3cret")
        assert _cli(capsys, f"output_dir={tmp_path / 'c'}", *items)[0] == 0
    finally:
        server.stop()


def test_another_architecture_is_refused_at_the_first_push(model_dir, tmp_path, capsys):
    tok, _ = tiny_policy()
    wide = tiny_policy(hidden_size=64)[1]  # the same vocabulary and tokenizer, other shapes
    server = ThreadServer(
        rollout_app(hf_backend(wide.eval(), tok, torch.device("cpu")), tok, model_name="wide", eos_token_ids=[2])
    )
    try:
        code, line = _cli(
            capsys, f"output_dir={tmp_path / 'run'}", f"rollout_urls={server.url}", *_small_run(tmp_path, model_dir)
        )
    finally:
        server.stop()
    assert code == 2 and line.startswith(
        f"reinforcepp train: rollout server {server.url} refused the weights: weight 'model."
    ), line
    assert re.search(r"' has shape \[[\d, ]+\], this server's model \[[\d, ]+\]$", line), line


def test_token_ids_outside_the_vocabulary_stop_the_run_naming_the_server(model_dir, tmp_path, capsys):
    tok, _ = tiny_policy()

    def respond(handler, n):
        path = handler.path.split("?")[0]
        body = handler.body
        if path == "/info":
            send_json(
                handler,
                200,
                {
                    "kind": "rollout",
                    "protocol": 1,
                    "vocab_size": 48,
                    "tokenizer_hash": None,
                    "eos_token_ids": [2],
                    "keep_versions": 3,
                    "dtype": "float32",
                    "max_request_bytes": 1 << 20,
                },
            )
        elif path == "/weights":
            send_json(handler, 200, {"chunk": 0})
        elif path == "/weights/commit":
            send_json(handler, 200, {"run": body["run"], "versions": [body["version"]], "weight_version": None})
        else:
            rows = len(body["prompt_ids"]) * body["samples_per_prompt"]
            send_json(
                handler,
                200,
                {
                    "response_ids": [[999]] * rows,
                    "logprobs": [[-1.0]] * rows,
                    "truncated": [True] * rows,
                    "weight_version": body["weight_version"],
                },
            )

    server = ScriptedServer(respond)
    try:
        code, line = _cli(
            capsys, f"output_dir={tmp_path / 'run'}", f"rollout_urls={server.url}", *_small_run(tmp_path, model_dir)
        )
    finally:
        server.stop()
    assert code == 1
    assert (
        line == f"reinforcepp train: step 1: rollout server {server.url}: response 0 holds token id 999, "
        "outside the policy's vocabulary [0, 48)"
    )


def test_settings_are_checked_before_any_model_loads():
    for values, message in (
        ({"engine": "remote"}, "engine=remote samples on rollout servers: set rollout_urls="),
        ({"rollout_urls": "http://127.0.0.1:1,http://127.0.0.1:1"}, "names a server twice"),
        ({"rollout_urls": "vllm+ftp://x:1"}, "is not an http:// or https:// URL"),
        ({"rollout_urls": "http://127.0.0.1:1", "rollout_timeout": 0}, "rollout_timeout must be > 0"),
        ({"rollout_timeout": 5.0}, "rollout_timeout is set but engine='hf'; it applies to engine=remote only"),
    ):
        with pytest.raises(Exception, match=message.replace("(", r"\(").replace("+", r"\+")):
            LMConfig.from_dict(values)
    assert LMConfig.from_dict({"rollout_urls": "http://127.0.0.1:1,vllm+http://localhost:2"}).engine == "remote"


# ------------------------------------------------------------------ torchrun: FSDP and LoRA push from rank 0
def _ranks_body(rank, world, tmp, out, url):
    from reinforcepp.lm.parallel import full_state_dict, stream_full_weights

    results = {}
    for name, extra in (("fsdp", {"fsdp": True}), ("lora", {"lora_rank": 4, "lr": 1e-2})):
        tok, model = tiny_policy()
        t = Trainer(
            small_config(Path(tmp) / name, total_steps=2, rollout_urls=[url], prompts_per_step=4, **extra),
            model=model,
            tokenizer=tok,
            reward_funcs=[fraction_of_a],
            train_dataset=reverse_dataset(16),
        )
        t.train()
        streamed = dict(stream_full_weights(t.policy))
        whole = full_state_dict(t.policy, all_ranks=True)
        same = set(streamed) <= set(whole) and all(
            torch.equal(streamed[k], whole[k].to(streamed[k].device)) for k in streamed
        )
        gen = t.engine.generate(_ids(tok), 2, SamplingParams(6, temperature=0.8, seed=5)) if rank == 0 else None
        lp = None
        if rank == 0:
            plain = tiny_policy()[1]
            plain.load_state_dict({k: v for k, v in streamed.items()}, strict=False)
            batch = collate(gen.prompt_ids, gen.response_ids, tok.pad_token_id)
            with torch.no_grad():
                mine = response_logprobs(
                    plain, batch.input_ids, batch.attention_mask, batch.response_length, temperature=0.8
                ).logprobs
            lp = float(((mine - gen.sampler_logprob_tensor(batch.response_length)).abs() * batch.response_mask).max())
        results[name] = {
            "same": same,
            "gap": lp,
            "version": t.engine.weight_version,
            "missing": sorted(set(whole) - set(streamed)),
        }
    torch.save(results, f"{out}.{rank}")


def test_fsdp_and_lora_push_streamed_from_rank_0(model_dir, tmp_path):
    """Two gloo ranks: the weights are gathered tensor by tensor (FSDP) or merged (LoRA) on every
    rank and pushed by rank 0; the server then samples with the trained policy (log-probs equal
    to 1e-4), and the streamed weights equal the gathered state dict."""
    from tests.ranks import run_trainer_ranks

    server = _serve(model_dir)
    try:
        out = str(tmp_path / "result")
        run_trainer_ranks(_ranks_body, (str(tmp_path), out, server.url))
        served = _info(server.url)
    finally:
        server.kill()
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    for name in ("fsdp", "lora"):
        assert parts[0][name]["same"] and parts[1][name]["same"], name
        assert parts[0][name]["gap"] < 1e-4 and parts[0][name]["version"] == 2, parts[0][name]
    assert parts[0]["fsdp"]["missing"] == parts[0]["lora"]["missing"] == ["lm_head.weight"]  # the tied weight once
    assert served["versions"][-1] == 2


def test_rollout_urls_are_given_again_on_resume(tmp_path):
    """A URL is never read back from a run folder (run/folder.py): rollout_urls neither."""
    from reinforcepp.run.folder import RunDirError, merge_resumed_config

    with pytest.raises(RunDirError, match="rollout_urls="):
        merge_resumed_config({"rollout_urls": ["http://10.0.0.1:8000"], "engine": "remote"}, {"output_dir": "x"},
                             {"rollout_urls": []})
