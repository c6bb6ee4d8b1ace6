"""Asynchronous rollouts (lm/producer.py): the schedule of weight versions, exact resume, the
staleness bound, and the checks before any model loads."""

from __future__ import annotations

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.engines import ENGINES, Generation, SharedPromptSampler, register_engine
from reinforcepp.lm.config import LMConfig
from reinforcepp.lm.producer import call_seed
from reinforcepp.lm.rollout import Rollout
from reinforcepp.lm.trainer import Trainer, drop_stale
from reinforcepp.run import read_metrics
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy


class CountingEngine(SharedPromptSampler):
    """Records every call: the weight version it sampled with, its seed, its length budget."""

    def __init__(self, model, tokenizer, *, device="cpu", config=None):
        super().__init__(model, tokenizer, device=device, config=config)
        self.calls: list[tuple[int, int | None, int, int]] = []

    def generate(self, prompt_ids, samples_per_prompt, params):
        self.calls.append((self.weight_version, params.seed, params.max_new_tokens, samples_per_prompt))
        return super().generate(prompt_ids, samples_per_prompt, params)


@pytest.fixture
def counting():
    register_engine("counting", CountingEngine)
    yield
    ENGINES.pop("counting")


def _trainer(path, **overrides):
    tok, model = tiny_policy()
    return Trainer(small_config(path, **overrides), model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
                   train_dataset=reverse_dataset(64))


def _train_rows(trainer):
    return [r for r in read_metrics(trainer.run_dir) if r.get("kind") == "train"]


@pytest.mark.parametrize("n", [1, 2])
def test_rollout_of_step_r_is_sampled_by_version_r_minus_1_minus_n(tmp_path, counting, n):
    t = _trainer(tmp_path, engine="counting", async_rollouts=n, total_steps=5)
    t.train()
    calls = t.producer.engine.calls
    assert [version for version, *_ in calls] == [max(0, r - 1 - n) for r in range(1, 6)]  # one call per step
    assert len({seed for _, seed, *_ in calls}) == 5 and None not in {seed for _, seed, *_ in calls}
    rows = _train_rows(t)
    assert [r["staleness/sequence_max"] for r in rows] == [float(min(s - 1, n)) for s in range(1, 6)]
    assert all(r["staleness/sequence_max"] <= n and r["async/dropped_stale_samples"] == 0 for r in rows)
    assert t.engine is not t.producer.engine and t.producer.model is not t.policy  # the producer samples its own copy
    # step 1 samples the very weights it trains (w = 1 up to the two forwards' numerics); later ones older weights
    assert abs(rows[0]["rollout/is_weight_mean"] - 1) < 1e-5 and abs(rows[-1]["rollout/is_weight_mean"] - 1) > 1e-4


def test_partial_rollouts_advance_one_version_per_segment(tmp_path, counting):
    t = _trainer(tmp_path, engine="counting", async_rollouts=1, partial_rollouts=True, total_steps=4, max_new_tokens=6)
    t.train()
    calls = t.producer.engine.calls
    # step r: a first segment of 3 tokens (4 samples per prompt) with version max(0, r - 2), then the unfinished
    # responses go on (1 sample each) with version r - 1
    starts = [i for i, c in enumerate(calls) if c[3] == 4]
    assert [calls[i][0] for i in starts] == [0, 0, 1, 2] and all(calls[i][2] == 3 for i in starts)
    for r, (i, end) in enumerate(zip(starts, starts[1:] + [len(calls)]), start=1):
        assert [c[0] for c in calls[i + 1 : end]] == [r - 1] * (end - i - 1)
        assert all(c[3] == 1 for c in calls[i + 1 : end])
    rows = _train_rows(t)
    assert rows[-1]["staleness/mixed_sequence_fraction"] > 0  # responses whose tokens come from two versions


def test_async_runs_repeat_exactly_and_differ_from_synchronous(tmp_path):
    runs = []
    for name in ("a", "b"):
        runs.append(_trainer(tmp_path / name, async_rollouts=1, total_steps=3))
        runs[-1].train()
    for pa, pb in zip(runs[0].policy.parameters(), runs[1].policy.parameters()):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)
    sync = _trainer(tmp_path / "sync", total_steps=3)
    sync.train()
    assert any(not torch.equal(a, b) for a, b in zip(runs[0].policy.parameters(), sync.policy.parameters()))


def test_zero_is_the_synchronous_loop(tmp_path):
    zero = _trainer(tmp_path / "zero", async_rollouts=0, total_steps=2)
    assert zero.producer is None and zero.config.resolved_rollout_correction == "none"
    zero.train()  # trainers share the global generator: the second one is built after the first has run
    plain = _trainer(tmp_path / "plain", total_steps=2)
    plain.train()
    for a, b in zip(zero.policy.parameters(), plain.policy.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("settings", [dict(async_rollouts=1), dict(async_rollouts=2),
                                      dict(async_rollouts=2, partial_rollouts=True),
                                      dict(async_rollouts=1, dynamic_filtering=True, max_filter_rounds=3)])
def test_resume_equals_uninterrupted(tmp_path, settings):
    common = dict(total_steps=5, save_every=2, deterministic=True, **settings)
    full = _trainer(tmp_path / "full", **common)
    full.train()
    first = _trainer(tmp_path / "cut", **common)
    original_step = first.train_step

    def crash_after_three():
        if first.step == 3:
            raise KeyboardInterrupt("killed")
        return original_step()

    first.train_step = crash_after_three
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert first.checkpoints.latest().name.endswith("00000002")
    resumed = _trainer(tmp_path / "cut", resume=True, **common)
    assert resumed.step == 2
    resumed.train()
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    volatile = lambda r: {  # noqa: E731
        k: v for k, v in r.items() if not k.startswith(("time", "perf/", "producer/", "tokens_per_s"))}
    assert [volatile(r) for r in read_metrics(full.run_dir)] == [volatile(r) for r in read_metrics(resumed.run_dir)]


def test_nothing_staler_than_n_is_trained_on():
    gen = Generation([[1]] * 4, [[5, 6], [5], [7, 7], [8]], torch.zeros(4, dtype=torch.bool),
                     token_versions=[[3, 3], [3], [1, 3], [3]])  # sample 2 has a token of version 1
    rollout = Rollout([{}] * 4, ["p"] * 4, ["c"] * 4, gen, torch.arange(4.0), {}, {})
    kept = drop_stale(rollout, version=4, max_staleness=2, k=2)  # version 4 - 1 = 3 > 2: the second group goes
    assert kept.generation.response_ids == [[5, 6], [5]] and kept.counts["async/dropped_stale_samples"] == 2.0
    assert drop_stale(rollout, version=3, max_staleness=2, k=2).counts["async/dropped_stale_samples"] == 0.0
    with pytest.raises(RuntimeError, match="every sample"):
        drop_stale(rollout, version=9, max_staleness=1, k=2)


def test_call_seeds_are_distinct_and_repeatable():
    seeds = {call_seed(s, rank, step, call)
             for s in (0, 1) for rank in (0, 1) for step in range(50) for call in range(4)}
    assert len(seeds) == 2 * 2 * 50 * 4 and all(0 <= x < 2**63 for x in seeds)
    assert call_seed(3, 1, 7, 2) == call_seed(3, 1, 7, 2)


def test_async_settings_are_checked_before_any_model_loads():
    cases = {
        "async_rollouts must be >= 0": {"async_rollouts": -1},
        "partial_rollouts=true continues generations": {"partial_rollouts": True},
        "must bracket 1": {"async_rollouts": 1, "rollout_correction": "mask", "rollout_correction_low": 1.5,
                           "rollout_correction_high": 3},
        "rollout_correction_low=0.5 applies to rollout_correction=mask only": {"async_rollouts": 1,
                                                                                "rollout_correction_low": 0.5},
        "rollout_correction_low/high are set but rollout_correction=none": {"rollout_correction_high": 3.0},
        "engine 'hf_generate' draws from the generator the trainer uses": {"async_rollouts": 1,
                                                                            "engine": "hf_generate"},
        "rollout_correction_high must be a finite number": {"async_rollouts": 1,
                                                             "rollout_correction_high": float("inf")},
    }
    for message, values in cases.items():
        with pytest.raises(ConfigError, match=message):
            LMConfig.from_dict(values)
    assert LMConfig.from_dict({"async_rollouts": 2}).resolved_rollout_correction == "truncate"
    register_engine("blind", SharedPromptSampler, logprobs=False)
    try:
        with pytest.raises(ConfigError, match="needs the log-probs the engine sampled with, and engine 'blind'"):
            LMConfig.from_dict({"async_rollouts": 1, "engine": "blind"})
    finally:
        ENGINES.pop("blind")


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_builtin_task_learns_with_asynchronous_rollouts(tmp_path, n):
    """`reinforcepp train async_rollouts=N`: the README's built-in job, each sample up to N versions
    old, reaches the held-out accuracy of the synchronous run (0.91 there)."""
    from reinforcepp.cli import main

    run = tmp_path / "run"
    assert main(["train", f"async_rollouts={n}", f"output_dir={run}", "progress=false", "tensorboard=false",
                 "eval_every=60"]) == 0
    rows = read_metrics(run)
    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if r.get("kind") == "train"]
    assert evals[-1]["eval/accuracy"] >= 0.8 and evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"] + 0.3, evals
    assert max(r["staleness/sequence_max"] for r in train) == n and min(r["rollout/is_ess"] for r in train) > 0.5


@pytest.mark.slow
def test_tools_task_learns_with_asynchronous_rollouts(tmp_path):
    """Multi-turn episodes through the producer: `task=tools async_rollouts=1` learns to call the tool."""
    from reinforcepp.cli import main

    run = tmp_path / "run"
    assert main(["train", "task=tools", "async_rollouts=1", f"output_dir={run}", "progress=false", "tensorboard=false",
                 "eval_every=40"]) == 0
    evals = [r for r in read_metrics(run) if r.get("kind") == "eval"]
    assert evals[-1]["eval/accuracy"] >= 0.8 and evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"] + 0.3, evals


def _async_ranks(rank, world, tmp, out):
    from pathlib import Path

    results = {}
    for name, extra in (("ddp", {}), ("fsdp", {"fsdp": True}), ("lora", {"lora_rank": 4, "lr": 1e-2})):
        t = _trainer(Path(tmp) / name, async_rollouts=1, total_steps=3, prompts_per_step=4, micro_batch_size=8, **extra)
        t.train()
        state = (t.parallel.gather_state(t.policy) if name == "fsdp"
                 else {k: v.clone() for k, v in t.policy.state_dict().items()})
        rows = [r for r in read_metrics(t.run_dir) if r.get("kind") == "train"] if rank == 0 else []
        results[name] = {"state": state, "staleness": [r["staleness/sequence_max"] for r in rows],
                         "versions": sorted({v for g in t.producer.log.values() for gen in g
                                             for row in gen.token_versions for v in row})}
    torch.save(results, f"{out}.{rank}")


def test_async_rollouts_under_torchrun_ddp_fsdp_and_lora(tmp_path):
    """Each rank runs its own producer for its prompts; the ranks stay in step (DDP's weights
    equal on both ranks; FSDP's gathered weights trained) and the schedule holds on every rank."""
    out = str(tmp_path / "result")
    from tests.ranks import run_trainer_ranks

    run_trainer_ranks(_async_ranks, (str(tmp_path), out))
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    for name in ("ddp", "lora"):
        for key, value in parts[0][name]["state"].items():
            torch.testing.assert_close(value, parts[1][name]["state"][key], atol=0, rtol=0)
    assert parts[0]["fsdp"]["state"]
    assert parts[0]["ddp"]["staleness"] == [0.0, 1.0, 1.0] == parts[0]["fsdp"]["staleness"]
    assert parts[0]["lora"]["staleness"] == [0.0, 1.0, 1.0]


def test_async_rollouts_with_served_reference_and_reward_equal_local(tmp_path):
    """The producer scores through a reward server (the trainer's evaluations share it under a
    lock) while the trainer takes reference log-probs from a reference server: the run equals
    the same asynchronous run with both local."""
    from tests.remote.servers import ThreadServer
    from reinforcepp.serve.reference import reference_app
    from reinforcepp.serve.reward import reward_app

    tok, ref = tiny_policy()
    reward_server = ThreadServer(reward_app(fraction_of_a, spec="fraction_of_a"))
    ref_server = ThreadServer(reference_app(ref.eval(), tok, model_name="ref"))
    try:
        runs = {}
        for name, reward, reference in (("local", fraction_of_a, None),
                                        ("remote", reward_server.url + "/rewards", ref_server.url)):
            from reinforcepp.run.rng import set_seed

            set_seed(0)
            tok, model = tiny_policy()
            settings = dict(async_rollouts=1, total_steps=3, eval_every=2, kl_placement="loss", estimator="grpo")
            if reference is not None:
                settings["ref_model"] = reference
            t = Trainer(small_config(tmp_path / name, **settings), model=model, tokenizer=tok, reward_funcs=[reward],
                        train_dataset=reverse_dataset(64), eval_dataset=reverse_dataset(8, seed=9))
            t.train()
            runs[name] = read_metrics(t.run_dir)
    finally:
        reward_server.stop()
        ref_server.stop()
    assert len(runs["local"]) == len(runs["remote"]) and any(r["kind"] == "eval" for r in runs["remote"])
    for a, b in zip(runs["local"], runs["remote"]):  # the same samples; the served log-probs differ in the last bits,
        for key, tol in (("reward/mean", 0), ("eval/reward_mean", 0), ("kl/mean_token", 1e-5), ("loss/policy", 1e-4)):
            if key in a:  # which Adam amplifies where the gradient is near zero
                assert b[key] == pytest.approx(a[key], abs=tol), key


def test_train_step_alone_starts_the_producer(tmp_path):
    t = _trainer(tmp_path, async_rollouts=1, total_steps=3)
    first = t.train_step()  # without train(): the first rollout starts the producer
    second = t.train_step()
    assert first["staleness/sequence_max"] == 0.0 and second["staleness/sequence_max"] == 1.0
    t.producer.close()
