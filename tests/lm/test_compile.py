"""``torch_compile``: the compiled decoding step (over a static cache) and the compiled update
give the eager numbers. Each test compiles a one-layer model once (seconds on a CPU)."""

from types import SimpleNamespace

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.engines import SamplingParams, SharedPromptSampler
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run.rng import set_seed
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_decoding_over_a_static_cache_equals_the_eager_loop():
    tok, model = tiny_policy()
    prompts = [tok.encode(t) for t in ("abc", "ba", "cabcab", "a")]  # different widths: left padding
    eager = SharedPromptSampler(model, tok)
    compiled = SharedPromptSampler(model, tok, config=SimpleNamespace(torch_compile="decode"))
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    a, b = eager.generate(prompts, 3, greedy), compiled.generate(prompts, 3, greedy)
    assert a.response_ids == b.response_ids
    assert torch.equal(a.truncated, b.truncated)
    for x, y in zip(a.sampler_logprobs or [], b.sampler_logprobs or []):
        torch.testing.assert_close(torch.tensor(y), torch.tensor(x), atol=1e-5, rtol=0)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=5)
    torch.manual_seed(3)
    c = eager.generate(prompts, 3, params)
    torch.manual_seed(3)
    graphs = _graphs()
    d = compiled.generate(prompts, 3, params)
    assert c.response_ids == d.response_ids
    # another batch of prompts with another width, in the same cache bucket: no new graph
    compiled.generate([tok.encode(t) for t in ("cc", "abcabcab", "b", "ab")], 3, params)
    assert _graphs() == graphs
    assert len(compiled.static.caches) == 1  # one (rows, length) cache, reused


def _steps(trainer: Trainer, n: int) -> list[dict]:
    set_seed(trainer.config.seed)
    return [trainer.train_step() for _ in range(n)]


def test_compiled_update_gives_the_eager_weights_and_metrics(tmp_path):
    def make(name, **overrides):
        tok, model = tiny_policy()
        cfg = small_config(tmp_path / name, total_steps=3, micro_batch_size=16, **overrides)
        return Trainer(cfg, model=model, tokenizer=tok, reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(64))

    compiled, eager = make("compiled", torch_compile="update"), make("eager")
    assert hasattr(compiled.models.train_policy, "_orig_mod") and not hasattr(eager.models.train_policy, "_orig_mod")
    mc, me = _steps(compiled, 3), _steps(eager, 3)
    for pc, pe in zip(compiled.policy.parameters(), eager.policy.parameters()):
        torch.testing.assert_close(pc, pe, atol=1e-5, rtol=1e-4)
    initial = tiny_policy()[1].parameters()
    assert any((pc - p0).abs().max() > 1e-3 for pc, p0 in zip(compiled.policy.parameters(), initial))  # it trained
    for x, y in zip(mc, me):
        for key in ("reward/mean", "loss/policy", "grad_norm", "kl/mean_token"):
            assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(y[key])), (key, x[key], y[key])


@pytest.mark.parametrize("overrides, words", [
    (dict(torch_compile="decode", engine="hf_generate"), "use torch_compile=update or engine=hf"),
    (dict(torch_compile="all", fsdp=True), "fsdp=true is not supported"),
])
def test_compile_settings_that_cannot_work_are_refused(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        small_config(tmp_path, **overrides)
