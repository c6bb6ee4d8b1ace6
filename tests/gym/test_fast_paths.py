"""The speed paths of the trainer compute what the plain ones do: inverse-CDF sampling draws from
the categorical, the functional MLP equals the ``nn.Sequential``, the log-only entropy equals the
differentiable one without entering the graph, and the per-epoch gathered mini-batches equal
indexing every mini-batch by its own slice of the permutation."""

from __future__ import annotations

import pytest
import torch
from gymnasium import spaces

from reinforcepp.gym import GymConfig, GymTrainer
from reinforcepp.gym.policy import Critic, Policy, sample_categorical


def test_inverse_cdf_sampling_matches_the_probabilities():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.5]])
    n = 200_000
    logp = probs.log().repeat_interleave(n, 0)
    a = sample_categorical(logp, torch.Generator().manual_seed(0)).view(3, n)
    freq = torch.stack([torch.bincount(row, minlength=4) for row in a]).float() / n
    # binomial std at n = 2e5 is <= 0.0012: 0.005 is over 4 sigma, yet a wrong CDF comparison fails it
    assert torch.allclose(freq, probs, atol=5e-3)
    assert freq[1, 1] == 1.0 and freq[2, 1] == 0.0 and freq[2, 2] == 0.0  # zero-probability actions never drawn
    assert a.dtype == torch.long and int(a.max()) <= 3


def test_inverse_cdf_sampling_never_overflows_a_short_cdf():
    # exp(logp) sums to 1 - 1e-4 here: u above the last cdf value must still give the last action
    logp = torch.log(torch.tensor([[0.5, 0.4999]])).repeat(10_000, 1)
    assert int(sample_categorical(logp, torch.Generator().manual_seed(1)).max()) <= 1


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_functional_mlp_equals_the_sequential(activation):
    box = spaces.Box(-1, 1, (3,))
    obs = torch.randn(7, 3)
    policy = Policy(box, spaces.Discrete(4), [16, 8], activation=activation)
    critic = Critic(box, [16, 8], activation=activation)
    assert torch.allclose(policy(obs), policy.net(obs), atol=1e-6)
    assert torch.allclose(critic(obs), critic.net(obs).squeeze(-1), atol=1e-6)


@pytest.mark.parametrize("action_space", [spaces.Discrete(3), spaces.Box(-1, 1, (2,))])
def test_log_only_entropy_equals_the_differentiable_one(action_space):
    policy = Policy(spaces.Box(-1, 1, (3,)), action_space, [8], init_log_std=-0.3)
    obs = torch.randn(6, 3)
    actions, _ = policy.act(obs, torch.Generator().manual_seed(0))
    lp1, ent1 = policy.logprobs_entropy(obs, actions)
    lp2, ent2 = policy.logprobs_entropy(obs, actions, entropy_grad=False)
    assert torch.equal(lp1, lp2) and torch.allclose(ent1, ent2, atol=0)
    assert ent1.requires_grad and not ent2.requires_grad and lp2.requires_grad


def test_update_equals_per_mini_batch_indexing(tmp_path):
    """One update of the trainer (mini-batches gathered once per epoch, fused Adam, log-only
    entropy) against a plain loop (index every mini-batch, reference Adam, entropy in the graph
    with coefficient 0): the same weights."""
    from reinforcepp.core import aggregate, policy_loss, value_loss

    cfg = GymConfig(env_id="CartPole-v1", estimator="gae", num_envs=2, steps_per_env=100, epochs=3, mini_batch_size=64,
                    output_dir=str(tmp_path), progress=False, tensorboard=False)
    tr = GymTrainer(cfg)
    try:
        tr.collector.reset(0)
        batch = tr.collector.collect(0)
        adv, ret = tr.make_experience(batch)
        import copy

        policy0, critic0 = copy.deepcopy(tr.policy), copy.deepcopy(tr.critic)
        gen = torch.Generator().manual_seed(123)
        tr.generator.manual_seed(123)
        tr.update(batch, adv, ret)

        params = list(policy0.parameters()) + list(critic0.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5, foreach=False)
        n = batch.num_steps
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, cfg.mini_batch_size):
                idx = order[start : start + cfg.mini_batch_size]
                ones = torch.ones(idx.shape[0])
                lp, ent = policy0.logprobs_entropy(batch.obs[idx], batch.actions[idx])
                pl = policy_loss(lp, batch.logprobs[idx], adv[idx], cfg.eps_low, cfg.eps_high, cfg.dual_clip)
                loss = aggregate(pl.loss, ones) - 0.0 * aggregate(ent, ones)
                v_loss = value_loss(critic0(batch.obs[idx]), batch.values[idx], ret[idx], cfg.value_clip)
                loss = loss + cfg.value_coef * aggregate(v_loss, ones)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
        for mine, ref in ((tr.policy, policy0), (tr.critic, critic0)):
            for (k, a), b in zip(mine.state_dict().items(), ref.state_dict().values()):
                assert torch.allclose(a, b, atol=1e-6), k
    finally:
        tr.close()


def test_compiled_update_gives_the_eager_weights_and_metrics(tmp_path):
    """torch_compile=true: the same update (a short last mini-batch included: 200 steps in
    mini-batches of 64), the same weights and logged metrics, to float rounding."""
    import copy

    def trainer(name: str, compiled: bool) -> GymTrainer:
        cfg = GymConfig(env_id="CartPole-v1", estimator="gae", num_envs=2, steps_per_env=100, epochs=2,
                        mini_batch_size=64, entropy_coef=0.01, output_dir=str(tmp_path / name), progress=False,
                        tensorboard=False, torch_compile=compiled)
        return GymTrainer(cfg)

    eager, compiled = trainer("eager", False), trainer("compiled", True)
    try:
        eager.collector.reset(0)
        batch = eager.collector.collect(0)
        adv, ret = eager.make_experience(batch)
        compiled.policy.load_state_dict(eager.policy.state_dict())
        compiled.critic.load_state_dict(eager.critic.state_dict())
        start = copy.deepcopy(eager.policy.state_dict())
        metrics = []
        for tr in (eager, compiled):
            tr.generator.manual_seed(7)
            metrics.append(tr.update(batch, adv, ret))
        for a, b in ((eager.policy, compiled.policy), (eager.critic, compiled.critic)):
            for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
                torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4, msg=k)
        assert any((eager.policy.state_dict()[k] - v).abs().max() > 1e-4 for k, v in start.items())  # it trained
        for key, value in metrics[0].items():
            assert metrics[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    finally:
        eager.close()
        compiled.close()
