"""Environment steps per second: Stable-Baselines3 PPO vs reinforcepp at the rl-zoo settings.

    pip install -e '.[bench]'        # stable-baselines3 + box2d (once)
    python benchmarks/gym_vs_sb3.py   # CartPole-v1 and LunarLander-v3, prints a table

Both trainers get rl-baselines3-zoo's PPO hyperparameters for the environment (``SETTINGS``:
environments, steps per environment per rollout, epochs, mini-batch size in time steps, gamma,
GAE lambda, entropy coefficient, learning rate and its schedule), the same network (separate
64-64 tanh MLPs for policy and value, Adam, gradient clip 0.5), sync vectorisation in-process,
one torch thread, CPU. The headline is ours ``gae`` (PPO with a critic) against SB3's PPO; the
critic-free ``reinforce_pp`` does less work per step and is reported apart, labelled as such.
They run one after the other in this process, the order rotated every repeat, ``--repeats``
times each; the table shows the median and range of the per-repeat ratios. The time covers the
training loop only (rollout + update), not evaluation or process start. Two clocks: wall time
(what a user waits) and this process's CPU time (``time.process_time``), which a busy shared
machine disturbs much less: another process delays us but does not bill us for its time. The
ratios are given for both.

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

# rl-baselines3-zoo's PPO hyperparameters (hyperparams/ppo.yml) for these environments, used on both
# sides. One difference from the zoo, the same on both sides: the clip range stays 0.2 (the zoo
# decays it linearly on CartPole; ours has no clip schedule). The learning rate decays linearly
# where the zoo's does (CartPole: lin_1e-3).
SETTINGS = {
    "CartPole-v1": dict(n_envs=8, n_steps=32, epochs=20, mini_batch=256, lr=1e-3, lr_linear=True, gamma=0.98, lam=0.8,
                        ent_coef=0.0),
    "LunarLander-v3": dict(n_envs=16, n_steps=1024, epochs=4, mini_batch=64, lr=3e-4, lr_linear=False, gamma=0.999,
                           lam=0.98, ent_coef=0.01),
}
# the environment steps of one measurement (whole rollouts)
DEFAULT_STEPS = {"CartPole-v1": 40_960, "LunarLander-v3": 32_768}


def run_sb3(env_id: str, s: dict, steps: int, seed: int) -> tuple[float, float]:
    """Environment steps per second of wall time and per second of CPU time."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = make_vec_env(env_id, n_envs=s["n_envs"], seed=seed, vec_env_cls=DummyVecEnv)
    lr = (lambda remaining: remaining * s["lr"]) if s["lr_linear"] else s["lr"]
    model = PPO("MlpPolicy", env, n_steps=s["n_steps"], batch_size=s["mini_batch"], n_epochs=s["epochs"],
                learning_rate=lr, gamma=s["gamma"], gae_lambda=s["lam"], ent_coef=s["ent_coef"], clip_range=0.2,
                max_grad_norm=0.5, device="cpu", seed=seed, verbose=0,
                policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh))
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    env.close()
    return model.num_timesteps / wall, model.num_timesteps / cpu


def run_ours(
    env_id: str, s: dict, steps: int, seed: int, estimator: str, compiled: bool = False
) -> tuple[float, float]:
    """Environment steps per second of wall time and per second of CPU time. ``compiled``:
    ``torch_compile=true``; its first iteration (which compiles) runs before the clock starts,
    and its time is printed."""
    import tempfile

    from reinforcepp.gym import GymConfig, GymTrainer

    with tempfile.TemporaryDirectory() as d:
        cfg = GymConfig(env_id=env_id, estimator=estimator, num_envs=s["n_envs"], steps_per_env=s["n_steps"],
                        epochs=s["epochs"], mini_batch_size=s["mini_batch"], lr=s["lr"],
                        lr_schedule="linear" if s["lr_linear"] else "constant", gamma=s["gamma"], lam=s["lam"],
                        entropy_coef=s["ent_coef"], eps_low=0.2, eps_high=0.2, max_grad_norm=0.5, hidden_sizes=[64, 64],
                        activation="tanh", total_env_steps=steps, seed=seed, output_dir=d, torch_threads=1,
                        progress=False,
                        torch_compile=compiled)
        trainer = GymTrainer(cfg)
        trainer.collector.reset(seed)
        if compiled:
            t0 = time.perf_counter()
            trainer.step()
            first = time.perf_counter() - t0
            print(f"    ({estimator}, compiled: first iteration {first:.1f} s, not timed)", flush=True)
        start_steps = trainer.env_steps
        t0, c0 = time.perf_counter(), time.process_time()
        while trainer.iteration < cfg.num_iterations:
            trainer.step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        trainer.close()
    return (trainer.env_steps - start_steps) / wall, (trainer.env_steps - start_steps) / cpu


def _ratio_range(ratios: list[float]) -> str:
    """``median x [min-max]`` of per-repeat ratios."""
    return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", default="CartPole-v1,LunarLander-v3")
    p.add_argument("--steps", type=int, default=None,
                   help="environment steps per measurement (default: per environment, whole rollouts)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="also ours gae with torch_compile=true (its compiling first iteration is not timed)")
    args = p.parse_args()
    torch.set_num_threads(1)
    import os

    import stable_baselines3

    runners = {"sb3": lambda e, s, n, seed: run_sb3(e, s, n, seed),
               "gae": lambda e, s, n, seed: run_ours(e, s, n, seed, "gae"),
               "reinforce_pp": lambda e, s, n, seed: run_ours(e, s, n, seed, "reinforce_pp")}
    if args.compile:
        runners["gae_compiled"] = lambda e, s, n, seed: run_ours(e, s, n, seed, "gae", compiled=True)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, stable-baselines3 {stable_baselines3.__version__}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} repeats, "
          f"order rotated every repeat; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("headline: ours `gae` (PPO with a critic, like SB3's) / SB3 PPO; "
          "`reinforce_pp` (critic-free: less work per step, not like for like) is listed apart")
    for env_id in args.envs.split(","):
        s = SETTINGS[env_id]
        steps = args.steps or DEFAULT_STEPS[env_id]
        sps: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
        for r in range(args.repeats):
            order = list(runners)[r % len(runners):] + list(runners)[: r % len(runners)]
            for name in order:
                sps[name].append(runners[name](env_id, s, steps, args.seed + r))
        desc = " ".join(f"{k}={v}" for k, v in s.items())
        print(f"\n{env_id} ({steps} env steps per measurement): {desc}")
        for c, clock in enumerate(("wall", "cpu")):
            med = {k: statistics.median(x[c] for x in v) for k, v in sps.items()}
            # ratio per repeat (the sides of one repeat ran back to back): median and range
            ratios = {k: [a[c] / b[c] for a, b in zip(sps[k], sps["sb3"])] for k in ("gae", "reinforce_pp")}
            print(f"  {clock:<4} steps/s  SB3 PPO {med['sb3']:7.0f}  ours gae {med['gae']:7.0f}  "
                  f"ours reinforce_pp {med['reinforce_pp']:7.0f}  |  "
                  f"gae/SB3 {_ratio_range(ratios['gae'])}  "
                  f"(critic-free reinforce_pp/SB3 {_ratio_range(ratios['reinforce_pp'])})", flush=True)
            if "gae_compiled" in sps:
                rc = [a[c] / b[c] for a, b in zip(sps["gae_compiled"], sps["sb3"])]
                compiled = statistics.median(x[c] for x in sps["gae_compiled"])
                print(f"  {clock:<4} steps/s  ours gae compiled {compiled:7.0f}  |  "
                      f"gae compiled/SB3 {_ratio_range(rc)}", flush=True)
    load = os.getloadavg()
    print("\n(environment steps per second of wall time / of this process's CPU time; "
          "median [range] over repeats of the per-repeat ratio; higher is better; "
          f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")


if __name__ == "__main__":
    main()
