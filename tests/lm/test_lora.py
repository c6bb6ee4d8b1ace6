"""LoRA through PEFT, and activation checkpointing.

* only the adapter tensors get gradients; the base weights stay bit-identical;
* the reference (adapters off) gives exactly the base model's log-probs, with no second copy;
* resume from a checkpoint = uninterrupted (adapter and its AdamW state), which used to crash
  with "element 0 of tensors does not require grad";
* the final checkpoint's merged model loads with ``from_pretrained`` and greedy-generates what
  the adapter model does; ``full_state_dict`` (weight sync) gives the same merged weights;
* gradient checkpointing gives the same gradients;
* bad LoRA options are refused before any model loads.
"""

from __future__ import annotations

import copy
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.lm.logprobs import response_logprobs
from reinforcepp.lm.trainer import Trainer
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy

SETTINGS = dict(lora_rank=4, lora_alpha=8.0, kl_placement="loss", kl_coef=0.1, prompts_per_step=4, samples_per_prompt=4,
                micro_batch_size=8, total_steps=2, save_every=1, keep_last=3, deterministic=True, lr=5e-2)


def _trainer(tmp: Path, model=None, **overrides) -> Trainer:
    tok, fresh = tiny_policy()
    config = small_config(tmp, **{**SETTINGS, "output_dir": str(tmp), **overrides})
    return Trainer(config, model=model or fresh, tokenizer=tok, reward_funcs=[fraction_of_a],
                   train_dataset=reverse_dataset(16))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step LoRA run with a checkpoint after each step, and the base it started from."""
    tmp = tmp_path_factory.mktemp("lora")
    _, base = tiny_policy()
    trainer = _trainer(tmp / "run", model=copy.deepcopy(base))
    trainer.train()
    return tmp, trainer, base


def _adapter(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}


def test_only_adapters_train_and_the_reference_is_the_base(run):
    _, trainer, base = run
    trained = _adapter(trainer)
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert any(float(v.abs().max()) > 0 for n, v in trained.items() if ".lora_B." in n)  # B starts at 0: it learned
    base_now = trainer.policy.get_base_model().state_dict()
    for name, value in base.state_dict().items():  # frozen base weights, bit for bit
        key = name if name in base_now else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(base_now[key], value), name
    # gradients reach the adapters and nothing else
    exp = trainer.make_experience(trainer.rollout())
    loss = trainer.updater.micro_loss(
        exp, float(exp.response_mask.sum()), float(len(exp)), defaultdict(list), defaultdict(list)
    )
    loss.backward()
    with_grad = {n for n, p in trainer.policy.named_parameters() if p.grad is not None}
    assert with_grad == set(trained)
    trainer.optimizer.zero_grad(set_to_none=True)
    # the adapters-off reference = the base model, while the adapted policy differs
    b = exp.batch
    ref = response_logprobs(trainer.ref_model, b.input_ids, b.attention_mask, b.response_length).logprobs
    expected = response_logprobs(base.eval(), b.input_ids, b.attention_mask, b.response_length).logprobs
    torch.testing.assert_close(ref, expected, atol=1e-6, rtol=0)
    policy = response_logprobs(trainer.policy, b.input_ids, b.attention_mask, b.response_length).logprobs
    assert float(((policy - expected).abs() * b.response_mask).max()) > 1e-3


def test_lora_resume_equals_uninterrupted(run, tmp_path):
    tmp, trainer, _ = run
    ckpt = tmp / "run" / "checkpoints" / "step_00000001"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "COMPLETE", "adapter", "trainer_state.json", "trainer_state.safetensors"
    ]
    shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name)
    shutil.copytree(tmp / "run" / "reference", tmp_path / "reference")
    for name in ("reference.json", "metrics.jsonl"):  # a run folder holds its reference record and its log
        shutil.copy(tmp / "run" / name, tmp_path / name)
    resumed = _trainer(tmp_path, resume=True)
    assert resumed.step == 1 and sum(p.requires_grad for p in resumed.policy.parameters()) > 0
    resumed.train()
    final, expected = _adapter(resumed), _adapter(trainer)
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, atol=0, rtol=0, msg=name)  # bit-exact


def test_merged_final_model_loads_and_generates_like_the_adapter_model(run):
    from transformers import AutoModelForCausalLM

    tmp, trainer, _ = run
    final = tmp / "run" / "checkpoints" / "step_00000002"
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(final / "model")
    ids = torch.tensor([trainer.tokenizer("rev abcd=", add_special_tokens=False)["input_ids"]] * 2)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=trainer.tokenizer.pad_token_id)
    trainer.policy.eval()
    torch.testing.assert_close(
        merged.generate(ids, **kwargs), trainer.policy.generate(input_ids=ids, **kwargs), atol=0, rtol=0
    )
    from reinforcepp.lm.parallel import full_state_dict

    synced = full_state_dict(trainer.policy)  # what a generation engine's weight sync receives
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(synced[name], value, atol=1e-6, rtol=0, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    from reinforcepp.lm.batch import collate
    from reinforcepp.lm.models import enable_activation_checkpointing
    from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    grads = []
    for checkpointing in (False, True):
        model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=1)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model)
            assert model.model.layers[0].gradient_checkpointing  # the layers do recompute
        b = collate([[5, 6, 7], [8, 9]], [[10, 11, 2], [12, 2]], tok.pad_token_id)
        out = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length)
        (out.logprobs * b.response_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-7, rtol=0, msg=name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lora_alpha=16.0), "lora_alpha set but lora_rank=0"),
        (dict(lora_target_modules=["q_proj"]), "lora_target_modules set but lora_rank=0"),
        (dict(lora_rank=8, estimator="gae"), "lora_rank > 0 with estimator=gae"),
        (dict(lora_rank=8, ref_model="some/model"), "lora_rank > 0 with ref_model set"),
        (dict(fsdp=True, dynamic_filtering=True), "fsdp=true with dynamic_filtering=true"),
    ],
)
def test_impossible_combinations_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, **overrides)


def test_unknown_target_module_lists_the_linear_layers(tmp_path):
    message = ("qproj is not a linear layer of this model; "
               "its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    with pytest.raises(ConfigError, match=message):
        _trainer(tmp_path, lora_target_modules=["qproj"])


def test_a_peft_model_passed_from_python_resumes_and_trains(tmp_path):
    """The reported crash: a PEFT model given to Trainer(model=...) trained, but resuming gave a
    policy with 0 trainable parameters ("element 0 of tensors does not require grad")."""
    from peft import LoraConfig, get_peft_model

    _, base = tiny_policy()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    settings = dict(lora_rank=0, lora_alpha=32.0, total_steps=1, output_dir=str(tmp_path))
    first = _trainer(tmp_path, model=peft_model, **settings)
    assert first.models.lora and type(first.ref_model).__name__ == "AdaptersOff"
    first.train()
    resumed = _trainer(tmp_path, resume=True, **{**settings, "total_steps": 2})
    trainable = [n for n, p in resumed.policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    resumed.train()
    assert resumed.step == 2
