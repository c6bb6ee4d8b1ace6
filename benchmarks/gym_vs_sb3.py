"""Environment steps per second: Stable-Baselines3 PPO vs reinforcepp, matched settings.

    pip install -e '.[bench]'        # stable-baselines3 + box2d (once)
    python benchmarks/gym_vs_sb3.py   # CartPole-v1 and Pendulum-v1, prints a table

Both trainers get the same number of environments (``n_envs``), steps per environment per
rollout (``n_steps``), epochs, mini-batch size (time steps), network (separate 64-64 tanh MLPs
for policy and value, Adam), learning rate, sync vectorisation in-process, one torch thread,
CPU. They run one after the other in this process, alternating, ``--repeats`` times each; the
table shows the median. The time covers the training loop only (rollout + update), not
evaluation or process start. Two clocks: wall time (what a user waits) and this process's CPU
time (``time.process_time``), which a busy shared machine disturbs much less: another process
delays us but does not bill us for its time. The ratios are given for both.

Environment stepping, the part both share: SB3 steps its ``DummyVecEnv`` (a Python loop over
``gym.make`` envs with SB3's ``Monitor``), ours a Gymnasium ``SyncVectorEnv`` (a Python loop over
``gym.make`` envs, same-step autoreset, ``copy=False``). Both step the same environments
serially in this process. Ours runs twice: ``gae`` (a critic, like SB3's PPO: the
like-for-like comparison) and ``reinforce_pp`` (critic-free, our default).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SETTINGS = {
    "CartPole-v1": dict(n_envs=8, n_steps=128, epochs=4, mini_batch=256, lr=3e-4),
    "Pendulum-v1": dict(n_envs=8, n_steps=256, epochs=10, mini_batch=256, lr=3e-4),
}


def run_sb3(env_id: str, s: dict, steps: int, seed: int) -> tuple[float, float]:
    """Environment steps per second of wall time and per second of CPU time."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = make_vec_env(env_id, n_envs=s["n_envs"], seed=seed, vec_env_cls=DummyVecEnv)
    model = PPO("MlpPolicy", env, n_steps=s["n_steps"], batch_size=s["mini_batch"], n_epochs=s["epochs"], learning_rate=s["lr"],
                gamma=0.99, gae_lambda=0.95, ent_coef=0.0, max_grad_norm=0.5,
                policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh), device="cpu", seed=seed, verbose=0)
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    env.close()
    return model.num_timesteps / wall, model.num_timesteps / cpu


def run_ours(env_id: str, s: dict, steps: int, seed: int, estimator: str) -> tuple[float, float]:
    """Environment steps per second of wall time and per second of CPU time."""
    import tempfile

    from reinforcepp.gym import GymConfig, GymTrainer

    with tempfile.TemporaryDirectory() as d:
        cfg = GymConfig(env_id=env_id, estimator=estimator, num_envs=s["n_envs"], steps_per_env=s["n_steps"], epochs=s["epochs"],
                        mini_batch_size=s["mini_batch"], lr=s["lr"], hidden_sizes=[64, 64], activation="tanh", total_env_steps=steps,
                        seed=seed, run_dir=d, torch_threads=1, progress=False)
        trainer = GymTrainer(cfg)
        trainer.collector.reset(seed)
        t0, c0 = time.perf_counter(), time.process_time()
        while trainer.iteration < cfg.num_iterations:
            trainer.step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        trainer.close()
    return trainer.env_steps / wall, trainer.env_steps / cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", default="CartPole-v1,Pendulum-v1")
    p.add_argument("--steps", type=int, default=40_960, help="environment steps per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    import stable_baselines3

    print(f"torch {torch.__version__}, stable-baselines3 {stable_baselines3.__version__}, torch threads {torch.get_num_threads()}, {args.steps} env steps x {args.repeats}")
    print(f"{'env':<14} {'clock':<5} {'settings':<48} {'SB3 PPO':>9} {'ours gae':>9} {'ours r++':>9} {'gae/SB3':>8} {'r++/SB3':>8}")
    for env_id in args.envs.split(","):
        s = SETTINGS[env_id]
        sps: dict[str, list[tuple[float, float]]] = {"sb3": [], "gae": [], "reinforce_pp": []}
        for r in range(args.repeats):
            sps["sb3"].append(run_sb3(env_id, s, args.steps, args.seed + r))
            sps["gae"].append(run_ours(env_id, s, args.steps, args.seed + r, "gae"))
            sps["reinforce_pp"].append(run_ours(env_id, s, args.steps, args.seed + r, "reinforce_pp"))
        desc = " ".join(f"{k}={v}" for k, v in s.items())
        for c, clock in enumerate(("wall", "cpu")):
            med = {k: statistics.median(x[c] for x in v) for k, v in sps.items()}
            print(f"{env_id:<14} {clock:<5} {desc:<48} {med['sb3']:9.0f} {med['gae']:9.0f} {med['reinforce_pp']:9.0f} "
                  f"{med['gae'] / med['sb3']:7.2f}x {med['reinforce_pp'] / med['sb3']:7.2f}x", flush=True)
    print("(environment steps per second of wall time / of this process's CPU time, median over repeats; higher is better)")


if __name__ == "__main__":
    main()
