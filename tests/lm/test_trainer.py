"""End-to-end tests of the language-model trainer on tiny local models (seconds each)."""

import json

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.core import ESTIMATORS, Advantages, kl_penalty, policy_loss, register_estimator
from reinforcepp.lm.config import LMConfig
from reinforcepp.errors import NonFiniteError
from reinforcepp.lm.trainer import Trainer
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy

REQUIRED_METRICS = [
    "reward/mean", "reward/std", "reward/min", "reward/max", "reward/fraction_of_a",
    "response/length_mean", "response/length_max", "response/truncated_frac",
    "kl/mean_token", "kl/mean_sequence", "kl/beta", "entropy", "loss/policy", "clip/frac_low", "clip/frac_high",
    "approx_kl", "grad_norm", "lr", "advantage/mean_token", "advantage/std_token", "advantage/mean_sample",
    "advantage/std_sample", "time/generate", "time/score", "time/forward", "time/update", "tokens_per_s",
]


def make_trainer(tmp_path, **overrides) -> Trainer:
    tok, model = tiny_policy()
    return Trainer(small_config(tmp_path, **overrides), model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
                   train_dataset=reverse_dataset(64))


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_reward_rises_for_every_estimator(tmp_path, estimator):
    # Easy dense reward (fraction of 'a' in the completion): every estimator must raise it clearly in 12 steps.
    trainer = make_trainer(tmp_path, estimator=estimator, total_steps=12, prompts_per_step=8, micro_batch_size=32)
    trainer.train()
    rewards = [r["reward/mean"] for r in read_metrics(trainer.run_dir) if r["kind"] == "train"]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, (estimator, rewards)


def test_run_directory_has_every_output(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=2, tensorboard=True, eval_every=1, log_samples_every=1)
    trainer.data.eval = reverse_dataset(8, seed=1)
    trainer.train()
    run = trainer.run_dir
    rows = read_metrics(run)
    train_rows = [r for r in rows if r["kind"] == "train"]
    missing = [k for k in REQUIRED_METRICS if k not in train_rows[-1]]
    assert not missing
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 1, 2]
    assert (run / "config.yaml").exists() and (run / "plots.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "completion", "reward", "reward/fraction_of_a"} <= set(samples[0])
    # The checkpoint is a Hugging Face model directory.
    from transformers import AutoModelForCausalLM

    ckpt = trainer.checkpoints.latest()
    loaded = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    for a, b in zip(loaded.parameters(), trainer.policy.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (ckpt / "model" / "model.safetensors").exists()


def _kl_case(tmp_path, placement):
    trainer = make_trainer(tmp_path, kl_placement=placement, kl_coef=0.5, total_steps=1)
    # Move the policy away from the reference so that the KL is not zero.
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout = trainer.rollout()
    return trainer, rollout, trainer.make_experience(rollout)


def test_kl_in_reward_enters_advantages_not_loss(tmp_path):
    trainer, rollout, exp = _kl_case(tmp_path, "reward")
    assert exp.kl is not None and float(exp.kl.abs().sum()) > 0
    # Policy loss gradient only: the loss has no KL term.
    from collections import defaultdict

    loss = trainer.updater.micro_loss(
        exp, float(exp.response_mask.sum()), float(len(exp)), defaultdict(list), defaultdict(list)
    )
    from reinforcepp.lm.logprobs import response_logprobs

    b = exp.batch
    logp = response_logprobs(trainer.policy, b.input_ids, b.attention_mask, b.response_length).logprobs
    m = b.response_mask
    expected = (policy_loss(logp, exp.old_logprobs, exp.advantages).loss * m).sum() / m.sum()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    # The KL is in the advantages instead: with beta = 0 they change.
    trainer.kl_controller.value = 0.0
    no_kl = trainer.make_experience(rollout)
    assert not torch.allclose(no_kl.advantages, exp.advantages)


def test_kl_in_loss_has_gradient_and_no_reward_term(tmp_path):
    trainer, rollout, exp = _kl_case(tmp_path, "loss")
    assert exp.kl is None and exp.ref_logprobs is not None
    from collections import defaultdict

    from reinforcepp.lm.logprobs import response_logprobs

    loss = trainer.updater.micro_loss(
        exp, float(exp.response_mask.sum()), float(len(exp)), defaultdict(list), defaultdict(list)
    )
    b = exp.batch
    logp = response_logprobs(trainer.policy, b.input_ids, b.attention_mask, b.response_length).logprobs
    m = b.response_mask
    pg = (policy_loss(logp, logp.detach(), exp.advantages).loss * m).sum() / m.sum()
    kl = (kl_penalty(logp, exp.ref_logprobs, "k3") * m).sum() / m.sum()
    torch.testing.assert_close(loss, pg + 0.5 * kl, atol=1e-6, rtol=0)
    g_loss = torch.autograd.grad(loss, trainer.policy.lm_head.weight)[0]
    g_pg = torch.autograd.grad(pg, trainer.policy.lm_head.weight, retain_graph=True)[0]
    assert not torch.allclose(g_loss, g_pg)  # the KL term carries gradient


def test_kl_none_loads_no_reference(tmp_path):
    trainer = make_trainer(tmp_path, kl_placement="none", total_steps=1)
    assert trainer.ref_model is None
    exp = trainer.make_experience(trainer.rollout())
    assert exp.kl is None and exp.ref_logprobs is None


def test_on_policy_skips_old_logprob_pass_and_ratio_is_one(tmp_path):
    trainer = make_trainer(tmp_path, kl_placement="loss", total_steps=1)
    exp = trainer.make_experience(trainer.rollout())
    assert exp.old_logprobs is None
    metrics = trainer.update(exp)
    assert metrics["clip/frac_low"] == 0 and metrics["clip/frac_high"] == 0 and abs(metrics["approx_kl"]) < 1e-12
    off = make_trainer(tmp_path / "b", kl_placement="loss", total_steps=1, mini_batch_size=8)
    assert off.make_experience(off.rollout()).old_logprobs is not None


def _recording_step(grads: list[list[torch.Tensor]], params: list[torch.nn.Parameter]):
    """An optimizer step that records the accumulated gradients instead of applying them."""

    def step() -> None:
        grads.append([p.grad.detach().clone() for p in params])

    return step


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_micro_batches_equal_one_batch(tmp_path):
    # token-mean over 4 micro-batches == one micro-batch of the whole mini-batch: the same
    # accumulated gradient reaches the optimizer (compared before Adam, which would hide a scale error).
    results = []
    for micro in (16, 4):
        trainer = make_trainer(tmp_path / str(micro), micro_batch_size=micro, total_steps=1, kl_placement="loss")
        torch.manual_seed(1)
        exp = trainer.make_experience(trainer.rollout())
        grads: list[list[torch.Tensor]] = []
        trainer.optimizer.step = _recording_step(grads, list(trainer.policy.parameters()))
        trainer.update(exp)
        results.append(grads[0])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_nan_never_reaches_the_weights(tmp_path):
    @register_estimator("nan_for_test", overwrite=True)
    def nan_estimator(inputs, params):
        a = torch.full_like(inputs.response_mask, float("nan"))
        return Advantages(a, a)

    try:
        trainer = make_trainer(
            tmp_path, estimator="nan_for_test", kl_placement="none", max_nonfinite_steps=2, total_steps=5
        )
        before = [p.detach().clone() for p in trainer.policy.parameters()]
        metrics = trainer.train_step()
        assert metrics["nonfinite/skipped_steps"] == 1
        for a, b in zip(before, trainer.policy.parameters()):
            assert torch.equal(a, b)
        assert all(not s for s in trainer.optimizer.state.values())  # AdamW moments untouched
        with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
            trainer.train_step()
    finally:
        ESTIMATORS.pop("nan_for_test", None)


def test_reward_function_error_names_function_and_sample(tmp_path):
    def picky(prompts, completions, **_):
        return [1.0 if i != 3 else float("nan") for i in range(len(completions))]

    tok, model = tiny_policy()
    trainer = Trainer(small_config(tmp_path), model=model, tokenizer=tok, reward_funcs=[picky],
                      train_dataset=reverse_dataset(16))
    with pytest.raises(ValueError, match=r"picky.*3|3.*picky"):
        trainer.train_step()


def test_reward_errors_can_drop_the_sample(tmp_path):
    def picky(prompts, completions, **_):
        return [None if i == 0 else 1.0 for i in range(len(completions))]

    tok, model = tiny_policy()
    trainer = Trainer(small_config(tmp_path, reward_on_error="drop"), model=model, tokenizer=tok, reward_funcs=[picky],
                      train_dataset=reverse_dataset(16))
    metrics = trainer.train_step()
    assert metrics["reward/dropped_samples"] == 1 and metrics["reward/dropped_groups"] == 1


def test_dataset_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "hi"}\n')
    tok, model = tiny_policy()
    with pytest.raises(Exception, match="prompt"):
        Trainer(small_config(tmp_path, train_data=str(path)), model=model, tokenizer=tok, reward_funcs=[fraction_of_a])


def test_dynamic_filtering_drops_all_equal_groups(tmp_path):
    scored: list[list[float]] = []  # the rewards of each generation round

    def constant_for_some(prompts, completions, **_):
        # Groups of prompts starting with 'rev a' get a constant reward; others vary.
        rewards = [0.0 if p.startswith("rev a") else float(len(c) % 2) for p, c in zip(prompts, completions)]
        scored.append(rewards)
        return rewards

    tok, model = tiny_policy()
    config = small_config(tmp_path, dynamic_filtering=True, max_filter_rounds=3)
    trainer = Trainer(config, model=model, tokenizer=tok, reward_funcs=[constant_for_some],
                      train_dataset=reverse_dataset(64))
    rollout = trainer.rollout()
    k = trainer.config.samples_per_prompt
    groups = rollout.rewards.view(-1, k)
    assert groups.shape[0] == trainer.config.prompts_per_step  # refilled to a whole batch
    assert (groups.max(1).values > groups.min(1).values).all()
    # every all-equal group of every round was dropped and counted, and there were some
    all_equal = sum(len(set(r[i : i + k])) == 1 for r in scored for i in range(0, len(r), k))
    assert all_equal > 0 and rollout.counts["filter/dropped_groups"] == all_equal
    assert rollout.counts["filter/rounds"] == len(scored) > 1


def test_config_errors_before_any_model_load():
    with pytest.raises(ConfigError, match="did you mean 'samples_per_prompt'"):
        LMConfig.from_dict({"samples_per_promt": 4})
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        LMConfig.from_dict({"estimator": "grpo", "samples_per_prompt": 1})
    with pytest.raises(ConfigError, match="does not divide"):
        LMConfig.from_dict({"prompts_per_step": 3, "samples_per_prompt": 2, "mini_batch_size": 4})
    with pytest.raises(ConfigError, match="cannot carry KL in the reward"):
        LMConfig.from_dict({"estimator": "rloo", "kl_placement": "reward"})
    with pytest.raises(ConfigError, match="unknown estimator 'reinforce_ppp'"):
        LMConfig.from_dict({"estimator": "reinforce_ppp"})
    cfg = LMConfig.load(None, ["lr=3e-5", "reward_funcs=a.py:f,b:g", "dual_clip=3", "kl_target=none"])
    assert cfg.lr == 3e-5 and cfg.reward_funcs == ["a.py:f", "b:g"] and cfg.dual_clip == 3.0 and cfg.kl_target is None


def test_resume_equals_uninterrupted(tmp_path):
    common = dict(total_steps=4, save_every=2, deterministic=True, kl_placement="reward", epochs=2, mini_batch_size=8)
    full = make_trainer(tmp_path / "full", **common)
    full.train()

    first = make_trainer(tmp_path / "cut", **common)
    original_step = first.train_step

    def crash_after_two():
        if first.step == 2:
            raise KeyboardInterrupt("killed")
        return original_step()

    first.train_step = crash_after_two
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert first.checkpoints.latest().name.endswith("00000002")
    tok, _ = tiny_policy()
    resumed = Trainer(small_config(tmp_path / "cut", resume=True, **common), tokenizer=tok,
                      reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(64))
    assert resumed.step == 2
    resumed.train()

    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    volatile = lambda r: {k: v for k, v in r.items() if not (k.startswith(("time", "perf/")) or k == "tokens_per_s")}  # noqa: E731
    assert [volatile(r) for r in read_metrics(full.run_dir)] == [volatile(r) for r in read_metrics(resumed.run_dir)]


def test_models_load_from_disk_by_path(tmp_path):
    # The hub-loading code path (from_pretrained) on models saved to disk: policy, reference and critic.
    tok, model = tiny_policy()
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    _, other = tiny_policy(seed=1)
    other.save_pretrained(tmp_path / "ref")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reverse_dataset(16)))
    rewards = tmp_path / "my_reward.py"
    rewards.write_text(
        "def has_a(prompts, completions, answer, **kw):\n    return [float('a' in c) for c in completions]\n"
    )
    cfg = small_config(tmp_path, model=str(tmp_path / "policy"), ref_model=str(tmp_path / "ref"), train_data=str(data),
                       reward_funcs=[f"{rewards}:has_a"], estimator="gae", total_steps=1)
    trainer = Trainer(cfg)
    torch.testing.assert_close(trainer.ref_model.lm_head.weight, other.lm_head.weight, atol=0, rtol=0)
    metrics = trainer.train_step()
    assert "reward/has_a" in metrics and "loss/value" in metrics and trainer.critic is not None


def test_python_api_config_is_typed_on_validation():
    cfg = LMConfig(lr="1e-5", total_steps="20", reward_funcs="a.py:f,b:g")
    cfg.validate()
    assert cfg.lr == 1e-5 and cfg.total_steps == 20 and cfg.reward_funcs == ["a.py:f", "b:g"]
    with pytest.raises(ConfigError, match="kl_placement='both'"):
        LMConfig(kl_placement="both").validate()


def test_models_loaded_from_disk_sit_in_aligned_memory(tmp_path):
    # from_pretrained memory-maps safetensors (tensors at file offsets); unaligned inputs make CPU
    # matmuls round differently, which is what made a resumed run drift from an uninterrupted one.
    from reinforcepp.lm.models import ALIGNMENT, load_causal_lm

    tok, model = tiny_policy()
    model.save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(str(tmp_path / "m"), dtype=torch.float32, device=torch.device("cpu"))
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in [*loaded.parameters(), *loaded.buffers()] if t.numel())
    for a, b in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
