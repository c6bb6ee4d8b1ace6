"""Kill -9 a run at random moments, resume it, and check that it ends exactly as an uninterrupted run.

    python benchmarks/faults.py --kills 10 --seed 0            # an LM run and a gym run
    python benchmarks/faults.py --only gym --kills 20

For each of an LM run (built-in tiny model, deterministic) and a Gymnasium run (CartPole):

1. an uninterrupted reference run, timed;
2. the same run in another folder, killed with SIGKILL at ``--kills`` moments: each moment is
   either uniform over the reference's wall time (which lands in generation, updates,
   evaluation, logging or checkpoint writes) or, every third kill, the instant a checkpoint's
   temporary directory appears (a kill during the checkpoint write). After each kill the run is
   resumed with ``--resume`` (or restarted with ``--overwrite`` when no checkpoint was complete
   yet); after the last kill it runs to the end;
3. comparison with the reference: final weights (every tensor of the last checkpoint, bit for
   bit), ``metrics.jsonl`` and ``samples.jsonl`` (every row, wall-clock fields excepted) and
   the TensorBoard scalars (every tag, one point per step, same values).

Prints one JSON line per run kind with the counts, and exits 1 if anything differed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("time", "perf/", "tokens_per_s")

LM_ARGS = ["sft_steps=0", "total_steps=8", "prompts_per_step=4", "samples_per_prompt=4", "max_new_tokens=4",
           "micro_batch_size=16", "save_every=1", "keep_last=2", "eval_every=2", "eval_max_prompts=8", "eval_samples=2",
           "log_samples_every=1", "tensorboard=true", "progress=false", "deterministic=true", "torch_threads=1",
           "seed=3"]
GYM_ARGS = ["--env", "CartPole-v1", "num_envs=4", "steps_per_env=64", "total_env_steps=6144", "save_every=512",
            "eval_every=1024", "eval_episodes=3", "tensorboard=true", "progress=false", "seed=3", "normalize_obs=true",
            "normalize_reward=true"]


def command(kind: str, run_dir: Path, *extra: str) -> list[str]:
    base = [sys.executable, "-m", "reinforcepp.cli"]
    if kind == "lm":
        return [*base, "train", f"output_dir={run_dir}", *LM_ARGS, *extra]
    return [*base, "gym", "--output-dir", str(run_dir), *GYM_ARGS, *extra]


def run(
    cmd: list[str], log: Path, kill_after: float | None = None, kill_on_save: Path | None = None
) -> tuple[int, str]:
    """Run ``cmd``; SIGKILL it after ``kill_after`` seconds, or as soon as a checkpoint's
    temporary directory appears under ``kill_on_save``. Returns (exit code, what happened)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        start = time.perf_counter()
        while proc.poll() is None:
            if kill_after is not None and time.perf_counter() - start >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return -9, "random"
            if kill_on_save is not None and _saving(kill_on_save / "checkpoints"):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return -9, "during_save"
            time.sleep(0.002)
    return proc.returncode, "finished"


def _saving(checkpoints: Path) -> bool:
    """A checkpoint is being written: its temporary directory exists."""
    return checkpoints.exists() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())


def has_checkpoint(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.exists() and any((p / "COMPLETE").exists() for p in root.iterdir() if p.name.startswith("step_"))


def rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)} for line in lines]


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"]
            if not t.split("/", 1)[-1].startswith(VOLATILE) and not t.startswith(VOLATILE)]
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}


def weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    root = run_dir / "checkpoints"
    last = max((p for p in root.iterdir() if p.name.startswith("step_")), key=lambda p: p.name)
    return {
        str(f.relative_to(last)) + ":" + k: v
        for f in sorted(last.rglob("*.safetensors"))
        for k, v in load_file(str(f)).items()
    }


def compare(ref: Path, got: Path) -> dict[str, bool]:
    import torch

    wa, wb = weights(ref), weights(got)
    ta, tb = tb_scalars(ref), tb_scalars(got)
    return {
        "weights": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
        "metrics": rows(ref / "metrics.jsonl") == rows(got / "metrics.jsonl"),
        "samples": rows(ref / "samples.jsonl") == rows(got / "samples.jsonl"),
        "tensorboard": ta == tb and all(len({s for s, _ in pts}) == len(pts) for pts in tb.values()),
    }


def faults(kind: str, kills: int, rng: random.Random, work: Path) -> dict[str, Any]:
    ref, got, log = work / f"{kind}-ref", work / f"{kind}-faults", work / f"{kind}.log"
    t0 = time.perf_counter()
    rc, _ = run(command(kind, ref), log)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{kind}: the reference run failed (exit {rc}); see {log}")
    counts = {"random": 0, "during_save": 0, "finished_before_kill": 0, "restarts_without_checkpoint": 0, "resumes": 0}
    started = False
    for i in range(kills):
        if not started:
            cmd = command(kind, got)
        elif has_checkpoint(got):
            cmd = command(kind, got, "--resume")
            counts["resumes"] += 1
        else:
            cmd = command(kind, got, "--overwrite")
            counts["restarts_without_checkpoint"] += 1
        started = True
        if i % 3 == 2:
            rc, what = run(cmd, log, kill_on_save=got)
        else:
            rc, what = run(cmd, log, kill_after=rng.uniform(0.5, 0.9 * wall))
        counts[what if what != "finished" else "finished_before_kill"] += 1
        if rc == 0:  # the run reached its end before the kill: start it over to keep killing
            os.replace(got, work / f"{kind}-faults-done-{i}")
            started = False
        elif rc != -9:
            raise SystemExit(f"{kind}: a resumed run failed (exit {rc}); see {log}")
    if has_checkpoint(got):
        final = command(kind, got, "--resume")
    else:
        final = command(kind, got, "--overwrite") if started else command(kind, got)
    rc, _ = run(final, log)
    if rc != 0:
        raise SystemExit(f"{kind}: the final resume failed (exit {rc}); see {log}")
    return {"kind": kind, "kills": kills, "reference_wall_s": round(wall, 1), **counts, "identical": compare(ref, got)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="kills per run kind")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--only", choices=("lm", "gym"), default=None)
    parser.add_argument("--work", default="runs/faults", help="scratch folder (emptied first)")
    args = parser.parse_args()
    import shutil

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    ok = True
    for kind in ([args.only] if args.only else ["lm", "gym"]):
        result = faults(kind, args.kills, rng, work)
        print(json.dumps(result), flush=True)
        ok &= all(result["identical"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
