"""Train to the documented Gymnasium targets and print a table (a benchmark, not a test).

    python benchmarks/gym_targets.py --env CartPole-v1 --seeds 0,1,2
    python benchmarks/gym_targets.py --env LunarLander-v3 --estimator gae --seeds 0
    python benchmarks/gym_targets.py --env Pendulum-v1 --estimator reinforce_pp lr=3e-4

Each (env, estimator) has a preset below (the settings the numbers in docs/gym.md were measured
with); ``key=value`` arguments override it. Seeds run one after the other, one torch thread
each. Every run leaves a full run directory under ``--out`` (metrics.jsonl, plots.png, ...),
and a summary line per seed is appended to ``--out/summary.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reinforcepp.gym import GymConfig, train
from reinforcepp.gym.presets import PRESETS
from reinforcepp.run import read_metrics

# target: (environment steps, threshold on the mean deterministic eval return)
TARGETS = {
    "CartPole-v1": (100_000, 475.0),
    "LunarLander-v3": (1_000_000, 200.0),
    "Pendulum-v1": (200_000, -250.0),
    "Hopper-v5": (1_000_000, None),
    "HalfCheetah-v5": (1_000_000, None),
}

_COMMON = dict(eval_every=10_000, eval_episodes=10, progress=False)

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--estimator", default="reinforce_pp")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="environment steps (default: the target's)")
    p.add_argument("--out", default="runs/gym_targets")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args()
    steps, threshold = TARGETS.get(args.env, (100_000, None))
    steps = args.steps or steps
    base = {**_COMMON, **PRESETS.get((args.env, args.estimator), {}), "env_id": args.env, "estimator": args.estimator,
            "total_env_steps": steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in base.items() if k not in _COMMON}
    print(f"{args.env} {args.estimator} {steps} steps, target {threshold}: {json.dumps(settings)}")
    passed = 0
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        run_dir = out / f"{args.env}_{args.estimator}_s{seed}"
        values = {**base, "seed": seed, "run_dir": str(run_dir)}
        items = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in values.items()]
        cfg = GymConfig.load(None, items + args.overrides)
        t0 = time.time()
        final = train(cfg)
        wall = time.time() - t0
        evals = [(r["step"], r["eval/return_mean"]) for r in read_metrics(run_dir) if r.get("kind") == "eval"]
        first_hit = next((s for s, v in evals if threshold is not None and v >= threshold), None)
        ok = threshold is not None and final["eval/return_mean"] >= threshold
        passed += ok
        row = {"env": args.env, "estimator": args.estimator, "seed": seed, "env_steps": steps,
               "final_eval": final["eval/return_mean"], "best_eval": max(v for _, v in evals),
               "first_step_at_target": first_hit, "target": threshold, "pass": ok, "wall_s": round(wall, 1),
               "curve": evals}
        with (out / "summary.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        verdict = "PASS" if ok else "below target" if threshold is not None else ""
        print(f"seed {seed}: final eval {final['eval/return_mean']:.1f}  best {row['best_eval']:.1f}  "
              f"first >= target at {first_hit}  ({wall:.0f} s)  {verdict}", flush=True)
    if threshold is not None:
        print(f"{passed}/{len(seeds)} seeds reach {threshold} at {steps} steps")


if __name__ == "__main__":
    main()
