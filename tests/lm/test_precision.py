"""bfloat16 autocast of the forward passes: the matmuls run in bfloat16, log-probs and losses stay
float32 and close to the float32 run's, and training still learns."""

import torch

from reinforcepp.lm.precision import autocast_dtype, cpu_has_fast_bf16
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy


def test_autocast_setting():
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None and autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_fast_bf16() else None)


def _trainer(tmp_path, **overrides) -> Trainer:
    tok, model = tiny_policy()
    return Trainer(small_config(tmp_path, **overrides), model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
                   train_dataset=reverse_dataset(64))


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_float32_logprobs(tmp_path):
    trainer = _trainer(tmp_path / "bf16", autocast="bfloat16", micro_batch_size=16)
    plain = _trainer(tmp_path / "fp32", micro_batch_size=16)
    seen: list[torch.dtype] = []
    trainer.policy.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    torch.manual_seed(0)
    exp = trainer.make_experience(trainer.rollout())
    assert seen and set(seen) == {torch.bfloat16}  # sampling and the early update forward
    out = trainer.updater.forward(exp.batch)
    ref = plain.updater.forward(exp.batch)
    assert out.logprobs.dtype == torch.float32
    m = exp.response_mask.bool()
    err = (out.logprobs - ref.logprobs)[m].abs().max()
    assert 0 < err < 0.1, err  # bfloat16 rounding, not a different model
    assert plain.rt.autocast_dtype is None and ref.logprobs.dtype == torch.float32


def test_reward_rises_with_bf16_autocast(tmp_path):
    trainer = _trainer(tmp_path, autocast="bfloat16", total_steps=12, prompts_per_step=8, micro_batch_size=32)
    trainer.train()
    rewards = [r["reward/mean"] for r in read_metrics(trainer.run_dir) if r["kind"] == "train"]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards


def test_bf16_full_finetuning_keeps_float32_master_weights_and_adam_state(tmp_path):
    # dtype=bfloat16 without FSDP: weights and AdamW state float32, compute under bf16 autocast,
    # so an update of 1e-4 of a weight (below bfloat16's 2^-8 resolution) is not rounded away.
    from reinforcepp.lm.tasks import build_char_tokenizer

    config = small_config(
        tmp_path, model=None, dtype="bfloat16", total_steps=1, prompts_per_step=4, micro_batch_size=16
    )
    trainer = Trainer(config, tokenizer=build_char_tokenizer(), reward_funcs=[fraction_of_a],
                      train_dataset=reverse_dataset(16))
    assert trainer.rt.dtype is torch.bfloat16 and trainer.rt.autocast_dtype is torch.bfloat16
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    seen: list[torch.dtype] = []
    trainer.policy.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    trainer.train_step()
    assert seen and set(seen) == {torch.bfloat16}
    states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.float32}
