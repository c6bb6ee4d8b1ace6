"""The engine registry: an engine declares its options and checks; the config asks the registry."""

from __future__ import annotations

import pytest

from reinforcepp.config import ConfigError
from reinforcepp.engines import (
    ENGINES,
    Generation,
    SharedPromptSampler,
    check_engine_config,
    get_engine,
    register_engine,
)
from reinforcepp.lm.config import LMConfig
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy


class GreedyFirstEngine(SharedPromptSampler):
    """The example of docs/architecture.md: the first sample of each prompt is the greedy answer."""

    def generate(self, prompt_ids, samples_per_prompt, params):
        from dataclasses import replace

        p, k = len(prompt_ids), samples_per_prompt - 1
        greedy = super().generate(prompt_ids, 1, replace(params, greedy=True))  # rows 0 .. p-1
        if k == 0:
            return greedy
        rest = super().generate(prompt_ids, k, params)  # rows p .. p + p*k - 1, prompt by prompt
        order = [row for i in range(p) for row in [i, *(p + i * k + m for m in range(k))]]
        return Generation.concat([greedy, rest]).take(order)


def _check(config):
    if config.samples_per_prompt < 2:
        raise ConfigError("engine=greedy_first needs samples_per_prompt >= 2")


@pytest.fixture
def greedy_first():
    register_engine("greedy_first", GreedyFirstEngine, help="first sample greedy", check=_check)
    yield
    ENGINES.pop("greedy_first")


def test_builtin_engines_are_registered_with_their_options():
    assert {"hf", "hf_generate", "vllm"} <= set(ENGINES)
    assert get_engine("vllm").options == ("vllm_gpu_memory_utilization", "vllm_sleep")
    assert get_engine("vllm").own_weights
    assert not get_engine("hf").own_weights and get_engine("hf").options == ()


def test_an_unknown_engine_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown generation engine 'sglang'; valid: hf, hf_generate, vllm"):
        LMConfig(engine="sglang").validate()


def test_another_engines_option_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^vllm_sleep is set but engine='hf'; it applies to engine=vllm only$"):
        LMConfig(engine="hf", vllm_sleep=True).validate()
    assert check_engine_config(LMConfig(engine="hf")).name == "hf"


def test_a_new_engine_is_one_module_and_one_registration(tmp_path, greedy_first):
    with pytest.raises(ConfigError, match="needs samples_per_prompt >= 2"):
        LMConfig(engine="greedy_first", samples_per_prompt=1).validate()
    tok, model = tiny_policy()
    from reinforcepp.lm.trainer import Trainer

    trainer = Trainer(small_config(tmp_path, engine="greedy_first", total_steps=1, samples_per_prompt=3,
                                   micro_batch_size=12), model=model, tokenizer=tok,
                      reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16))
    assert isinstance(trainer.engine, GreedyFirstEngine)
    rows = [trainer.train_data[i] for i in range(2)]
    gen = trainer.sampler.generate_and_score(rows, 3, trainer.sampler.sampling(), trainer.step)[0]
    greedy = trainer.sampler.generate_and_score(rows, 1, trainer.sampler.sampling(greedy=True), trainer.step)[0]
    # the first of each group is the greedy answer
    assert [gen.response_ids[0], gen.response_ids[3]] == greedy.response_ids
    assert gen.token_versions == [[0] * len(r) for r in gen.response_ids]
    trainer.train()
    assert trainer.engine.weight_version == 1  # synced after the update, with the step as the version
