"""The trainer keeps an engine that holds its own weights in sync, measures the sampler/trainer
log-prob mismatch, and applies truncated importance sampling. No vLLM needed: a real engine with
a copy of the weights (the shape vLLM has) stands in for it."""

from __future__ import annotations

import copy

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.lm.config import LMConfig
from reinforcepp.engines import (
    ENGINES,
    Generation,
    SharedPromptSampler,
    full_weights,
    register_engine,
)
from reinforcepp.lm.trainer import Trainer
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy


class CopyingEngine(SharedPromptSampler):
    """Samples from its own copy of the policy, refreshed only by ``sync_weights`` (counted)."""

    def __init__(self, model, tokenizer, *, device="cpu", config=None):
        super().__init__(copy.deepcopy(model), tokenizer, device=device)
        self.syncs = 0

    def sync_weights(self, model, weights=None, *, version=0):
        self.syncs += 1
        self.weight_version = version
        with torch.no_grad():
            mine = dict(self.model.named_parameters())
            for name, tensor in (weights or full_weights(model))():
                if name in mine:
                    mine[name].copy_(tensor)


class NoLogprobEngine(SharedPromptSampler):
    def generate(self, prompt_ids, samples_per_prompt, params):
        g = super().generate(prompt_ids, samples_per_prompt, params)
        return Generation(g.prompt_ids, g.response_ids, g.truncated)


@pytest.fixture
def copying_engine():
    register_engine("copying", CopyingEngine)
    register_engine("no_logprobs", NoLogprobEngine)
    yield
    ENGINES.pop("copying"), ENGINES.pop("no_logprobs")


def _trainer(tmp_path, **overrides):
    tok, model = tiny_policy()
    cfg = small_config(tmp_path, **overrides)
    return Trainer(cfg, model=model, tokenizer=tok, reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(64))


def _max_weight_gap(a, b):
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_engine_synced_after_every_step_that_changed_weights(tmp_path, copying_engine):
    t = _trainer(tmp_path, engine="copying", total_steps=3)
    initial = copy.deepcopy(t.policy)
    t.train()
    assert t.engine.syncs == 3  # once per step
    assert _max_weight_gap(t.policy, initial) > 1e-3  # training moved the weights ...
    assert _max_weight_gap(t.policy, t.engine.model) == 0.0  # ... and the engine has exactly them


def test_two_mini_batches_sync_once_per_step(tmp_path, copying_engine):
    t = _trainer(tmp_path, engine="copying", total_steps=2, mini_batch_size=8)  # 2 optimizer steps per RL step
    t.train()
    assert t.engine.syncs == 2 and _max_weight_gap(t.policy, t.engine.model) == 0.0


def test_a_step_whose_optimizer_steps_were_all_skipped_does_not_sync(tmp_path, copying_engine):
    from reinforcepp.core import ESTIMATORS, Advantages, register_estimator

    @register_estimator("nan_for_sync_test", overwrite=True)
    def nan_estimator(inputs, params):
        a = torch.full_like(inputs.response_mask, float("nan"))
        return Advantages(a, a)

    try:
        t = _trainer(
            tmp_path, engine="copying", estimator="nan_for_sync_test", kl_placement="none", max_nonfinite_steps=5
        )
        assert t.train_step()["nonfinite/skipped_steps"] == 1 and t.engine.syncs == 0
    finally:
        ESTIMATORS.pop("nan_for_sync_test", None)


def test_logprob_mismatch_logged_and_tiny_for_the_hf_engine(tmp_path):
    t = _trainer(tmp_path, total_steps=1, epochs=2)  # epochs=2: old_logprobs recomputed by a separate pass
    m = t.train_step()
    assert 0.0 <= m["rollout/logprob_abs_diff_mean"] <= m["rollout/logprob_abs_diff_max"] < 1e-4
    assert "rollout/tis_weight_mean" not in m


def test_stale_engine_weights_show_in_the_mismatch(tmp_path, copying_engine):
    t = _trainer(tmp_path, engine="copying", total_steps=1, lr=5e-2)
    with torch.no_grad():  # the policy moves without the engine being told
        for p in t.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = t.train_step()
    assert m["rollout/logprob_abs_diff_mean"] > 1e-2


def test_tis_weights_enter_the_loss(tmp_path, copying_engine):
    # a stale engine makes sampler != old; TIS with cap C weighs each token's loss by min(exp(old - sampler), C)
    torch.manual_seed(0)
    t = _trainer(tmp_path, engine="copying", total_steps=1, rollout_correction="truncate", rollout_correction_high=1.5)
    with torch.no_grad():
        for p in t.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = t.train_step()
    assert 0 < m["rollout/is_weight_mean"] <= 1.5 and abs(m["rollout/is_weight_mean"] - 1) > 1e-3
    assert m["rollout/is_weight_max"] <= 1.5 and m["rollout/truncated_fraction"] > 0


def test_tis_needs_an_engine_that_reports_logprobs(tmp_path, copying_engine):
    t = _trainer(tmp_path, engine="no_logprobs", rollout_correction="truncate")
    message = "rollout_correction=truncate needs the log-probs the engine sampled with, and engine 'no_logprobs'"
    with pytest.raises(ConfigError, match=message):
        t.train_step()


def test_hf_engines_report_the_sampled_distributions_logprobs():
    from reinforcepp.lm.batch import collate
    from reinforcepp.engines import (
        HFGenerationEngine,
        SamplingParams,
        filter_logits,
    )
    from reinforcepp.lm.logprobs import response_logprobs

    tok, model = tiny_policy(seed=3)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("rev abc=", "sort 312=")]
    for engine in (SharedPromptSampler(model, tok), HFGenerationEngine(model, tok)):
        torch.manual_seed(0)
        g = engine.generate(prompts, 3, SamplingParams(5, temperature=0.7, top_k=0, top_p=1.0))
        b = collate(g.prompt_ids, g.response_ids, tok.pad_token_id)
        ours = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length, temperature=0.7).logprobs
        sampler = g.sampler_logprob_tensor(b.response_length)
        assert sampler is not None
        assert float(((ours - sampler).abs() * b.response_mask).max()) < 1e-5
    assert filter_logits  # top-k / top-p logprobs are those of the truncated distribution (documented)


def test_vllm_config_errors_before_any_model_loads(monkeypatch):
    with pytest.raises(ConfigError, match="vllm_sleep is set but engine='hf'"):
        LMConfig.from_dict({"vllm_sleep": True})
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization is set but engine='hf'"):
        LMConfig.from_dict({"vllm_gpu_memory_utilization": 0.5})
    with pytest.raises(ConfigError, match="rollout_correction_high must be a finite number > 0"):
        LMConfig.from_dict({"rollout_correction": "truncate", "rollout_correction_high": 0})
    import reinforcepp.engines.vllm as ve

    monkeypatch.setattr(ve, "vllm_available", lambda: True)
    with pytest.raises(ConfigError, match=r"vllm_sleep=true needs a CUDA GPU"):
        LMConfig.from_dict({"engine": "vllm", "vllm_sleep": True, "device": "cpu"})
    with pytest.raises(ConfigError, match=r"vllm_gpu_memory_utilization must be in \(0, 1\]"):
        LMConfig.from_dict({"engine": "vllm", "vllm_gpu_memory_utilization": 1.5})
    with pytest.raises(ConfigError, match="dtype=float32"):
        LMConfig.from_dict({"engine": "vllm", "dtype": "float16", "device": "cpu"})


def test_engine_vllm_without_vllm_is_one_line_naming_the_install(monkeypatch, capsys, tmp_path):
    import reinforcepp.engines.vllm as ve
    from reinforcepp.cli import main

    monkeypatch.setattr(ve, "vllm_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # where the default run directory (runs/...) would go
    assert main(["train", "engine=vllm", "device=cpu"]) == 2
    out, err = capsys.readouterr()
    expected = f"reinforcepp train: engine=vllm needs vLLM, which is not installed: run {ve.INSTALL_HINT}"
    assert err.strip().splitlines() == [expected]
    assert "bash install.sh vllm" in ve.INSTALL_HINT
    # refused while the settings are checked: nothing printed, no run directory, no model loaded
    assert out == "" and list(tmp_path.iterdir()) == []
