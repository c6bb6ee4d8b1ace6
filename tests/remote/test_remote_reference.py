"""A reference model behind `reinforcepp serve reference` (a real server on 127.0.0.1): the same
log-probs and the same training run as the local reference, one-line errors at start, and a
server killed mid-run leaves a checkpoint that resumes once the server is back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reinforcepp.cli import main as reinforcepp_main
from reinforcepp.lm.batch import collate
from reinforcepp.lm.logprobs import response_logprobs
from reinforcepp.lm.trainer import Trainer
from reinforcepp.remote import RemoteError, RemoteReference, RemoteSettings
from reinforcepp.serve.reference import reference_app
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy
from tests.lm.test_lm_distributed import _settings, _train_once
from tests.ranks import run_trainer_ranks
from tests.remote.servers import ServeProcess, ThreadServer, free_port

torch.set_num_threads(1)
UNCOMPARABLE = ("time/", "perf/", "tokens_per_s")


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    """The tests' initial policy (tiny_policy(), seed 0) saved as a reference model."""
    path = tmp_path_factory.mktemp("reference")
    tok, model = tiny_policy()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def served(ref_dir):
    # A small token budget, so concurrent requests are packed into several forward passes.
    server = ServeProcess("reference", "--model", ref_dir, "--port", "0", "--max-batch-tokens", "96",
                          "--max-request-mb", "1")
    yield server
    server.kill()


def _random_batch(seed: int, prompts: int = 6, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=g))

    prompt_ids, response_ids = [], []
    for _ in range(prompts):
        p = torch.randint(4, 48, (rand(3, 10),), generator=g).tolist()
        for _ in range(k):
            prompt_ids.append(p)
            response_ids.append(torch.randint(4, 48, (rand(1, 8),), generator=g).tolist())
    return collate(prompt_ids, response_ids, 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_remote_logprobs_equal_local(served, temperature):
    tok, model = tiny_policy()
    batch = _random_batch(int(temperature * 10))
    reference = RemoteReference(served.url, RemoteSettings(concurrency=4), temperature=temperature, batch_size=4)
    info = reference.connect(model, tok)
    assert info["vocab_size"] == 48 and info["dtype"] == "float32"
    remote = reference.response_logprobs(batch.input_ids, batch.attention_mask, batch.response_length)
    mask = batch.response_mask
    assert remote.dtype == torch.float32 and remote.shape == mask.shape
    assert (remote[mask == 0] == 0).all()
    for share_prompt in (False, True):
        with torch.no_grad():
            local = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_length,
                                      temperature=temperature, share_prompt=share_prompt).logprobs
        torch.testing.assert_close(remote * mask, local * mask, atol=1e-6, rtol=0)
    reference.close()


def _train(tmp_path, name, **overrides):
    tok, model = tiny_policy()
    cfg = small_config(tmp_path / name, total_steps=3, share_prompt=True, **overrides)
    trainer = Trainer(cfg, model=model, tokenizer=tok, reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(64))
    trainer.train()
    return [r for r in read_metrics(trainer.run_dir) if r["kind"] == "train"]


@pytest.mark.parametrize("estimator,placement", [("reinforce_pp", "reward"), ("grpo", "loss")])
def test_run_with_remote_reference_equals_local(served, tmp_path, estimator, placement):
    local = _train(tmp_path, "local", estimator=estimator, kl_placement=placement)
    remote = _train(
        tmp_path, "remote", estimator=estimator, kl_placement=placement, ref_model=served.url, remote_batch_size=3
    )
    assert len(local) == len(remote) == 3
    assert local[-1]["kl/mean_token"] > 1e-4  # the policy moved away from the reference: the KL is tested
    for a, b in zip(local, remote):
        keys = {k for k, v in a.items() if isinstance(v, float) and not k.startswith(UNCOMPARABLE)}
        assert keys == {k for k, v in b.items() if isinstance(v, float) and not k.startswith(UNCOMPARABLE)}
        for k in keys:
            assert b[k] == pytest.approx(a[k], abs=1e-5, rel=1e-4), k


def test_trainer_takes_a_remote_reference_object(served, tmp_path):
    tok, model = tiny_policy()
    reference = RemoteReference(served.url, temperature=0.9)
    trainer = Trainer(small_config(tmp_path, temperature=0.9, kl_placement="loss"), model=model, tokenizer=tok,
                      reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16), ref_model=reference)
    assert trainer.ref_model is reference and reference.info["kind"] == "reference"
    exp = trainer.make_experience(trainer.rollout())
    b = exp.batch
    with torch.no_grad():
        local = response_logprobs(
            tiny_policy()[1], b.input_ids, b.attention_mask, b.response_length, temperature=0.9
        ).logprobs
    torch.testing.assert_close(exp.ref_logprobs * b.response_mask, local * b.response_mask, atol=1e-6, rtol=0)


def test_server_killed_mid_run_then_resume(ref_dir, tmp_path):
    server = ServeProcess("reference", "--model", ref_dir, "--port", "0")
    calls = []

    def reward_that_kills_the_server(prompts, completions, **_):
        calls.append(1)
        if len(calls) == 3:  # step 3 is scored; its reference pass comes next
            server.kill()
        return fraction_of_a(prompts, completions)

    cfg = small_config(tmp_path, total_steps=4, save_every=1, ref_model=server.url, remote_retries=2, remote_timeout=20)
    tok, model = tiny_policy()
    trainer = Trainer(cfg, model=model, tokenizer=tok, reward_funcs=[reward_that_kills_the_server],
                      train_dataset=reverse_dataset(64))
    with pytest.raises(RemoteError, match=r"^reference server .*/logprobs could not be reached after 3 attempt\(s\)"):
        trainer.train()
    assert trainer.step == 3
    latest = trainer.checkpoints.latest()
    assert latest == trainer.checkpoints.path(2)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(latest / "model")  # intact and loadable

    back = ServeProcess("reference", "--model", ref_dir, "--port", str(server.port))
    try:
        tok, model = tiny_policy()
        resumed = Trainer(cfg.replace(resume=True), model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
                          train_dataset=reverse_dataset(64))
        assert resumed.step == 2
        resumed.train()
    finally:
        back.kill()
    steps = [r["step"] for r in read_metrics(resumed.run_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def _rank_result(rank, world, tmp, out, url):
    tok, model = tiny_policy()
    trainer = Trainer(small_config(Path(tmp), **_settings(tmp), ref_model=url), model=model, tokenizer=tok,
                      reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    adv, metrics, params = _train_once(trainer, rank, world)
    torch.save({"advantages": adv, "loss": metrics["loss/policy"], "params": params}, f"{out}.{rank}")


def test_two_ranks_calling_the_server_equal_one_local_rank(served, tmp_path):
    """Under torch.distributed (gloo) each rank asks the server for its own responses' log-probs;
    the KL-in-loss update then matches one process with the local reference."""
    tok, model = tiny_policy()
    single = Trainer(small_config(tmp_path / "one", **_settings(tmp_path / "one")), model=model, tokenizer=tok,
                     reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    adv, metrics, params = _train_once(single, 0, 1)
    out = str(tmp_path / "result")
    run_trainer_ranks(_rank_result, (str(tmp_path / "two"), out, served.url))
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    n = adv.shape[0] // 2
    for r, part in enumerate(parts):
        width = part["advantages"].shape[1]
        torch.testing.assert_close(part["advantages"], adv[r * n : (r + 1) * n, :width], atol=1e-5, rtol=0)
        for a, b in zip(part["params"], params):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert parts[0]["loss"] == pytest.approx(metrics["loss/policy"], abs=1e-6)


# ------------------------------------------------------------------ one-line errors at start
def _cli(tmp_path, capsys, *items):
    run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"  # a fresh run folder per call
    code = reinforcepp_main(["train", f"output_dir={run}", "total_steps=1", "sft_steps=0", "progress=false",
                             "tensorboard=false", "eval_every=0", "remote_retries=1", *items])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1]


def test_url_that_does_not_answer(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, line = _cli(tmp_path, capsys, f"ref_model={url}")
    assert code == 2
    assert line == (f"reinforcepp train: reference server {url} does not answer; "
                    "start one with `reinforcepp serve reference --model PATH --port PORT`")


@pytest.fixture(scope="module")
def guarded():
    """The reference app with a token, in this process."""
    tok, model = tiny_policy()
    server = ThreadServer(reference_app(model.eval(), tok, model_name="guarded", token="s3cret"))
    yield server
    server.stop()


def test_wrong_or_missing_token_is_401(guarded, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("REINFORCEPP_REMOTE_TOKEN", raising=False)
    code, line = _cli(tmp_path, capsys, f"ref_model={guarded.url}")
    assert code == 2
    assert line.startswith(f"reinforcepp train: reference server {guarded.url}/info answered HTTP 401 (unauthorized)")
    monkeypatch.setenv("REINFORCEPP_REMOTE_TOKEN", "wrong")
    code, line = _cli(tmp_path, capsys, f"ref_model={guarded.url}")
    assert code == 2 and "HTTP 401" in line
    tok, model = tiny_policy()
    ok = RemoteReference(guarded.url, RemoteSettings(token="s3cret"))
    assert ok.connect(model, tok)["model"] == "guarded"
    import httpx

    assert httpx.get(guarded.url + "/health", trust_env=False).status_code == 200  # health needs no token
    assert httpx.post(guarded.url + "/logprobs", content=b"x" * 100, trust_env=False).status_code == 401


def test_other_vocabulary_names_both_sizes(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    server = ThreadServer(reference_app(other.eval(), None, model_name="other"))
    try:
        code, line = _cli(tmp_path, capsys, f"ref_model={server.url}")
    finally:
        server.stop()
    assert code == 2
    assert line == (f"reinforcepp train: reference server {server.url} has vocab size 60, the policy 48: "
                    "serve a reference with the policy's vocabulary")


def test_other_tokenizer_is_refused(served):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok, model = tiny_policy()
    vocab = tok.get_vocab()
    swapped = {t: (i if i < 4 else 4 + (len(vocab) - 1 - i)) for t, i in vocab.items()}  # same size, other ids
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=swapped, unk_token="<unk>")))
    with pytest.raises(RemoteError, match="uses another tokenizer"):
        RemoteReference(served.url).connect(model, other)


def test_server_refuses_bad_payloads(served):
    import httpx

    url = served.url + "/logprobs"
    bad = httpx.post(url, json={"prompt_ids": [[1, 2]], "response_ids": [[99]]}, trust_env=False)
    assert bad.status_code == 422 and "not a token id in [0, 48)" in bad.json()["error"]
    assert httpx.post(url, content=b"not json", trust_env=False).status_code == 400
    too_deep = b"[" * 100_000 + b"]" * 100_000  # for the parser
    assert httpx.post(url, content=too_deep, trust_env=False).status_code == 400
    long = httpx.post(url, json={"prompt_ids": [[5] * 90], "response_ids": [[6] * 10]}, trust_env=False)
    assert long.status_code == 422 and "100 tokens > --max-batch-tokens=96" in long.json()["error"]
    # within the token budget but past the model's 64 positions: refused, naming the limit (it answered 200 before)
    past = httpx.post(url, json={"prompt_ids": [[5] * 3, [5] * 60], "response_ids": [[6] * 2, [6] * 10]},
                      trust_env=False)
    assert past.status_code == 422
    assert past.json()["error"] == "row 1: a prompt + response of 70 tokens > the model's context of 64 positions"
    assert httpx.get(served.url + "/info", trust_env=False).json()["context_length"] == 64
    fits = httpx.post(url, json={"prompt_ids": [[5] * 54], "response_ids": [[6] * 10]}, trust_env=False)
    assert fits.status_code == 200  # 64 tokens fit
    huge = json.dumps({"prompt_ids": [[1] * 1_000_000], "response_ids": [[1]]}).encode()  # > --max-request-mb 1
    assert httpx.post(url, content=huge, trust_env=False).status_code == 413
