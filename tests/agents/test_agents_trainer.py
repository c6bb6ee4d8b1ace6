"""Multi-turn episodes on the LM trainer: the batch layout, the masks and every downstream
quantity counting only the model's tokens."""

from collections import defaultdict

import pytest
import torch

from reinforcepp.agents import EnvError
from reinforcepp.core import ESTIMATORS
from reinforcepp.engines import Generation
from reinforcepp.lm.logprobs import naive_response_logprobs, response_logprobs
from reinforcepp.lm.rollout import Rollout
from reinforcepp.lm.trainer import Trainer
from tests.agents.envs import (
    AsyncTwoTurnEnv,
    BadObservationEnv,
    NaNRewardEnv,
    TurnRewardEnv,
    TwoTurnEnv,
)
from tests.lm.helpers import reverse_dataset, seeded_rollout, small_config, tiny_policy


def make_trainer(tmp_path, env=TwoTurnEnv, **overrides):
    tok, model = tiny_policy()
    cfg = small_config(tmp_path, **{"max_new_tokens": 5, "max_turns": 3, **overrides})
    return Trainer(cfg, model=model, tokenizer=tok, train_dataset=reverse_dataset(32), env=env)


def rollout_of(trainer, n_rows=4, k=4, seed=0):
    return seeded_rollout(trainer, [trainer.train_data[i] for i in range(n_rows)], k, seed)


def test_episode_layout_and_masks(tmp_path):
    trainer = make_trainer(tmp_path)
    ro = rollout_of(trainer)
    gen = ro.generation
    obs = trainer.tokenizer(" ab ", add_special_tokens=False)["input_ids"]
    for resp, mask in zip(gen.response_ids, gen.response_masks):
        first = mask.index(0)  # turn 1 (ends with EOS or at max_new_tokens), then the observation, then turn 2
        assert resp[first : first + len(obs)] == obs and mask[first : first + len(obs)] == [0] * len(obs)
        assert all(m == 1 for m in mask[:first]) and all(m == 1 for m in mask[first + len(obs):])
    assert (gen.episodes.stats["turns"] == 2).all() and (gen.episodes.stats["calls"] == 1).all()
    # R = the environment's reward of the final turn (no reward functions): fraction of 'a' in turn 2
    expected = torch.tensor([t.count("a") / max(1, len(t)) for t in gen.episodes.final_texts])
    torch.testing.assert_close(ro.rewards, expected, atol=0, rtol=0)


def test_async_environment_gives_the_same_episodes(tmp_path):
    a = rollout_of(make_trainer(tmp_path / "a"))
    b = rollout_of(make_trainer(tmp_path / "b", env=AsyncTwoTurnEnv))
    assert a.generation.response_ids == b.generation.response_ids
    torch.testing.assert_close(a.rewards, b.rewards, atol=0, rtol=0)


def test_zero_gradient_on_environment_tokens(tmp_path):
    """d loss / d logits is exactly 0 at every position that predicts an observation token,
    and not at positions that predict the model's tokens."""
    trainer = make_trainer(tmp_path, share_prompt=False, kl_placement="loss", kl_coef=0.3, entropy_coef=0.01, epochs=2)
    exp = trainer.make_experience(rollout_of(trainer))
    captured = []

    def keep(module, inputs, out):
        out.retain_grad()
        captured.append(out)

    handle = trainer.policy.lm_head.register_forward_hook(keep)
    try:
        loss = trainer.updater.micro_loss(
            exp, float(exp.response_mask.sum()), float(len(exp)), defaultdict(list), defaultdict(list)
        )
        loss.backward()
    finally:
        handle.remove()
    grad = captured[0].grad  # (N, T + 1, V): position j predicts response token j
    per_token = grad[:, :-1].abs().sum(-1)
    mask = exp.response_mask
    assert (mask == 0).any() and bool((per_token[mask == 0] == 0).all())
    assert bool((per_token[mask == 1] > 0).all())


def hand_rollout(trainer):
    """Two episodes built by hand: model tokens at positions 0, 1, 4 and 0, 2 (observations at 2, 3
    and 1), rewards 1 and 0."""
    tok = trainer.tokenizer
    p = tok("rev ab=", add_special_tokens=False)["input_ids"]
    a, b, c = tok("abc", add_special_tokens=False)["input_ids"]
    gen = Generation([p, p], [[a, b, c, c, tok.eos_token_id], [a, c, tok.eos_token_id]], torch.tensor([False, False]),
                     response_masks=[[1, 1, 0, 0, 1], [1, 0, 1]])
    return Rollout([{}, {}], ["rev ab=", "rev ab="], ["x", "y"], gen, torch.tensor([1.0, 0.0]), {}, {})


def test_whitening_counts_only_model_tokens(tmp_path):
    trainer = make_trainer(tmp_path, kl_placement="none", samples_per_prompt=2, prompts_per_step=1)
    exp = trainer.make_experience(hand_rollout(trainer))
    # returns on model tokens: 1, 1, 1 and 0, 0: mu = 3/5, var = (3 * 0.4^2 + 2 * 0.6^2) / 5 = 0.24
    hi, lo = 0.4 / 0.24 ** 0.5, -0.6 / 0.24 ** 0.5
    expected = torch.tensor([[hi, hi, 0, 0, hi], [lo, 0, lo, 0, 0]])
    torch.testing.assert_close(exp.advantages, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(exp.response_mask, torch.tensor([[1.0, 1, 0, 0, 1], [1, 0, 1, 0, 0]]), atol=0, rtol=0)


def test_token_mean_and_lengths_count_only_model_tokens(tmp_path):
    trainer = make_trainer(
        tmp_path, kl_placement="none", estimator="reinforce", samples_per_prompt=2, prompts_per_step=1
    )
    ro = hand_rollout(trainer)
    exp = trainer.make_experience(ro)
    metrics = trainer.update(exp)
    # on-policy, ratio = 1: loss = -sum(A) / (model tokens) = -(1 + 1 + 1 + 0 + 0) / 5
    assert metrics["loss/policy"] == pytest.approx(-0.6, abs=1e-6)
    m = trainer.rollout_metrics(ro, exp)
    assert (m["response/length_mean"], m["response/length_max"], m["response/tokens"]) == (2.5, 3.0, 5.0)


def test_per_turn_rewards_are_credited_at_their_turn(tmp_path):
    trainer = make_trainer(tmp_path, env=TurnRewardEnv, kl_placement="none", estimator="reinforce")
    ro = rollout_of(trainer)
    info = ro.generation.episodes
    torch.testing.assert_close(ro.rewards, info.env_rewards, atol=0, rtol=0)  # R_i = 0.5 + final reward
    exp = trainer.make_experience(ro)
    for i, turns in enumerate(info.turn_rewards):
        (end1, r1), (end2, r2) = turns
        assert r1 == 0.5
        # reinforce: A = G; the first turn's tokens see both rewards, the second turn's only its own
        assert exp.advantages[i, 0] == pytest.approx(r1 + r2, abs=1e-6)
        assert exp.advantages[i, end2] == pytest.approx(r2, abs=1e-6)
        assert exp.advantages[i, end1 + 1 : end1 + 5].abs().sum() == 0  # the observation


@pytest.mark.parametrize("engine", ["hf", "hf_generate"])
def test_two_turn_logprobs_equal_one_forward(tmp_path, engine):
    """The log-probs of each turn scored with the transcript so far as its prompt equal the log-probs
    of the whole transcript scored in one forward pass (the one the trainer uses); greedy turns
    are the argmax of that forward, whichever engine generated them."""
    trainer = make_trainer(tmp_path, engine=engine)
    rows = [trainer.train_data[i] for i in range(3)]
    gen = trainer.sampler.generate_and_score(rows, 1, trainer.sampler.sampling(greedy=True), trainer.step)[0]
    exp = trainer.make_experience(Rollout(rows, [""] * 3, [""] * 3, gen, torch.zeros(3), {}, {}))
    b = exp.batch
    one = response_logprobs(trainer.policy, b.input_ids, b.attention_mask, b.response_length).logprobs
    naive = naive_response_logprobs(trainer.policy, b.input_ids, b.attention_mask, b.response_length)
    torch.testing.assert_close(one * b.response_mask, naive * b.response_mask, atol=1e-5, rtol=0)
    for i in range(3):
        mask, resp = gen.response_masks[i], gen.response_ids[i]
        start = 0
        while start < len(resp):
            end = start
            while end < len(resp) and mask[end] == 1:
                end += 1
            context = gen.prompt_ids[i] + resp[:start]
            ids = torch.tensor([context + resp[start:end]])
            turn = response_logprobs(trainer.policy, ids, torch.ones_like(ids), end - start).logprobs[0]
            torch.testing.assert_close(turn, one[i, start:end], atol=1e-5, rtol=0)
            logits = trainer.policy(ids).logits[0, len(context) - 1 : -1]
            assert logits.argmax(-1).tolist() == resp[start:end]
            start = end
            while start < len(resp) and mask[start] == 0:
                start += 1


def test_evaluate_reports_episode_metrics(tmp_path):
    trainer = make_trainer(tmp_path, eval_fraction=0.25, eval_max_prompts=4, eval_samples=2)
    metrics = trainer.evaluate()
    assert metrics["eval/turns"] == 2.0 and 0.0 <= metrics["eval/reward_mean"] <= 1.0


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_trains_on_episodes(tmp_path, estimator):
    trainer = make_trainer(tmp_path, estimator=estimator, total_steps=2, samples_per_prompt=2, epochs=2)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    metrics = trainer.train_step()
    assert all(
        torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if isinstance(v, float) and not k.startswith("time")
    )
    assert metrics["env/turns"] == 2.0 and metrics["nonfinite/skipped_steps"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


@pytest.mark.parametrize("env, message", [
    (BadObservationEnv, "environment BadObservationEnv, turn 2: the observation is a int, expected str"),
    (NaNRewardEnv, "environment NaNRewardEnv, turn 1: the reward is nan, expected a finite number"),
])
def test_bad_environment_output_is_one_line_naming_env_and_turn(tmp_path, env, message):
    trainer = make_trainer(tmp_path, env=env)
    with pytest.raises(EnvError, match="^" + message + "$"):
        trainer.train_step()
