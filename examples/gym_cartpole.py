"""REINFORCE++ on CartPole-v1 in one file, on top of the library's core.

    python examples/gym_cartpole.py            # ~15 s on one CPU thread; ends with a deterministic eval of 500.0

This is the whole algorithm for control, written out for reading: the math (returns, global
whitening, clipped surrogate, token-mean aggregation) comes from ``reinforcepp.core``; this
file only moves tensors. The library's trainer (``reinforcepp gym``, ``reinforcepp.gym``) does
the same plus logging, evaluation, checkpoints, normalisation and the ``gae`` critic.

Departures from the language-model setting, as in docs/gym.md: a response is an episode and
its tokens are time steps; rewards arrive per step (``step_rewards``); there is no reference
model (no KL); returns are discounted (gamma 0.99). There is no critic, so an episode is
trained on once it has ended: steps of an episode still running when an iteration ends are
kept and join a later batch (their ``old_logprobs`` are those of the policy that acted, and the
clipped ratio accounts for the policy having moved). CartPole's 500-step time limit is treated
as a terminal state.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from reinforcepp.core import AdvantageInputs, AdvantageParams, aggregate, compute_advantages, policy_loss

NUM_ENVS, STEPS_PER_ITER, ITERATIONS = 8, 1024, 60  # 61k environment steps
EPOCHS, MINI_BATCH, LR, GAMMA = 4, 256, 1e-3, 0.99

torch.set_num_threads(1)  # small MLP: one thread is fastest
torch.manual_seed(0)
envs = gym.make_vec(
    "CartPole-v1", NUM_ENVS, vectorization_mode="sync",
    vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
)
policy = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
optimizer = torch.optim.Adam(policy.parameters(), lr=LR)

# per env: (obs, action, logprob, reward) of the current episode
running: list[list[tuple]] = [[] for _ in range(NUM_ENVS)]
obs, _ = envs.reset(seed=0)

for iteration in range(ITERATIONS):
    # 1. collect: step every env; an episode that ends moves to `finished`
    finished: list[list[tuple]] = []
    for _ in range(STEPS_PER_ITER // NUM_ENVS):
        with torch.no_grad():
            logits = policy(torch.as_tensor(obs))
            actions = torch.distributions.Categorical(logits=logits).sample()
            logprobs = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1)
        next_obs, rewards, terminated, truncated, _ = envs.step(actions.numpy())
        for i in range(NUM_ENVS):
            running[i].append((obs[i], int(actions[i]), float(logprobs[i]), float(rewards[i])))
            if terminated[i] or truncated[i]:  # time limit treated as terminal
                finished.append(running[i])
                running[i] = []
        obs = next_obs
    if not finished:
        continue

    # 2. one row per episode, time steps as tokens, right-padded
    lengths = [len(ep) for ep in finished]
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).float()
    step_rewards = torch.zeros_like(mask)
    for row, ep in enumerate(finished):
        step_rewards[row, : len(ep)] = torch.tensor([s[3] for s in ep])
    flat = [s for ep in finished for s in ep]  # row-major order of the real steps
    b_obs = torch.as_tensor(np.stack([s[0] for s in flat]))
    b_actions = torch.tensor([s[1] for s in flat])
    b_old_logprobs = torch.tensor([s[2] for s in flat])

    # 3. REINFORCE++: discounted returns per episode, global whitening over every step
    inputs = AdvantageInputs(rewards=torch.zeros(len(finished)), response_mask=mask, step_rewards=step_rewards)
    advantages = compute_advantages("reinforce_pp", inputs, AdvantageParams(gamma=GAMMA)).advantages[mask.bool()]

    # 4. epochs of shuffled mini-batches of steps; clipped surrogate, token-mean
    for _ in range(EPOCHS):
        order = torch.randperm(len(flat))
        for start in range(0, len(flat), MINI_BATCH):
            idx = order[start : start + MINI_BATCH]
            logprobs = torch.log_softmax(policy(b_obs[idx]), -1).gather(-1, b_actions[idx, None]).squeeze(-1)
            token_loss = policy_loss(logprobs, b_old_logprobs[idx], advantages[idx]).loss
            loss = aggregate(token_loss, torch.ones(len(idx)), "token-mean")
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            optimizer.step()

    returns = [sum(s[3] for s in ep) for ep in finished]
    print(f"iter {iteration + 1:3d}  env steps {(iteration + 1) * STEPS_PER_ITER:6d}  episodes {len(finished):3d}  "
          f"return {np.mean(returns):6.1f}")

# deterministic evaluation: the argmax action, 10 episodes
env = gym.make("CartPole-v1")
scores = []
for episode in range(10):
    o, _ = env.reset(seed=1000 + episode)
    total, done = 0.0, False
    while not done:
        with torch.no_grad():
            o, r, term, trunc, _ = env.step(int(policy(torch.as_tensor(o)).argmax()))
        total, done = total + r, term or trunc
    scores.append(total)
print(f"deterministic evaluation over 10 episodes: mean return {np.mean(scores):.1f}")
