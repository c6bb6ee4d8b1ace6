"""Kill -9 a run at random moments, resume it, and check that it ends exactly as an uninterrupted run;
then tamper with the finished run folders and feed bad input, and check that each is refused.

    python benchmarks/faults.py --kills 10 --seed 0            # an LM run, a gym run, then the probes
    python benchmarks/faults.py --only gym --kills 20
    python benchmarks/faults.py --only probes                   # the probes alone (runs the references first)

For each of an LM run (built-in tiny model, deterministic) and a Gymnasium run (CartPole):

1. an uninterrupted reference run, timed;
2. the same run in another folder, killed with SIGKILL at ``--kills`` moments: each moment is
   either uniform over the work the run has left (timed from the end of its setup, the imports
   and models, when it first writes ``metrics.jsonl``: a kill in the setup only restarts it;
   the reference's work time scaled by the share of steps after its last checkpoint), which
   lands in generation, updates, evaluation, logging or checkpoint writes, or, every third
   kill, the instant a checkpoint's
   temporary directory appears (a kill during the checkpoint write). After each kill the run is
   resumed with ``--resume`` (or restarted with ``--overwrite`` when no checkpoint was complete
   yet); after the last kill it runs to the end;
3. comparison with the reference: final weights (every tensor of the last checkpoint, bit for
   bit), ``metrics.jsonl`` and ``samples.jsonl`` (every row, wall-clock fields excepted) and
   the TensorBoard scalars (every tag, one point per step, same values).

   The TensorBoard check reads the raw event files as well: each (tag, step) once, as any
   reader other than TensorBoard sees them.
4. the probes (:data:`PROBES`), each on a fresh copy of a finished reference run folder: a
   ``config.yaml`` naming code, models, reward sources or environments (the spellings that once
   slipped through, and more), a forged ``reference.json``, reference copy or gym ``state.json``,
   a deleted or cut ``metrics.jsonl``, a lost or binary ``config.yaml``; then runs that must stop
   with one line: a reward that calls ``os._exit(0)``, ``kl_coef=inf``, a gym run at ``lr=1e30``.
   Each must exit with its code (2, or 1 for the divergence), print one line with the expected
   words and no traceback, and never run the planted code (a marker file).

Prints one JSON line per run kind with the counts, one per probe and one summing the probes, and
exits 1 if anything differed or any probe was not refused as expected.
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


def run(cmd: list[str], log: Path, kill_after: float | None = None, kill_on_save: Path | None = None,
        setup: list[float] | None = None) -> tuple[int, str]:
    """Run ``cmd``; SIGKILL it ``kill_after`` seconds after its setup ended (imports, models: until
    it first writes ``metrics.jsonl``, which a resumed run rewrites first), or as soon as a
    checkpoint's temporary directory appears under ``kill_on_save``. Returns (exit code, what
    happened); ``setup`` gets the setup's seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run_dir = Path(next((a.split("=", 1)[1] for a in cmd if a.startswith("output_dir=")), None)
                   or cmd[cmd.index("--output-dir") + 1])
    metrics = run_dir / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns if metrics.exists() else None
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        start = time.perf_counter()
        working: float | None = None
        while proc.poll() is None:
            if working is None and metrics.exists() and metrics.stat().st_mtime_ns != before:
                working = time.perf_counter()
                if setup is not None:
                    setup.append(working - start)
            if kill_after is not None and working is not None and time.perf_counter() - working >= kill_after:
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


def done_fraction(kind: str, run_dir: Path) -> float:
    """How far the run's latest complete checkpoint is (0: none), from its step."""
    root = run_dir / "checkpoints"
    entries = list(root.iterdir()) if root.exists() else []
    done = [p for p in entries if p.name.startswith("step_") and (p / "COMPLETE").exists()]
    steps = [int(p.name[5:]) for p in done]
    total = 8 if kind == "lm" else 6144  # LM_ARGS total_steps, GYM_ARGS total_env_steps
    return max(steps, default=0) / total


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


def tb_raw(run_dir: Path) -> list[tuple[str, int, float]]:
    """Every scalar point of every raw event file, in file-name order (what a reader other than
    TensorBoard sees: no purge, no deduplication)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return [(v.tag, e.step, v.simple_value) for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
            for e in LegacyEventFileLoader(str(path)).Load() for v in e.summary.value
            if not v.tag.split("/", 1)[-1].startswith(VOLATILE) and not v.tag.startswith(VOLATILE)]


def compare(ref: Path, got: Path) -> dict[str, bool]:
    import torch

    wa, wb = weights(ref), weights(got)
    ta, tb = tb_scalars(ref), tb_scalars(got)
    raw = tb_raw(got)
    return {
        "weights": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
        "metrics": rows(ref / "metrics.jsonl") == rows(got / "metrics.jsonl"),
        "samples": rows(ref / "samples.jsonl") == rows(got / "samples.jsonl"),
        "tensorboard": ta == tb and all(len({s for s, _ in pts}) == len(pts) for pts in tb.values()),
        "tensorboard_raw_once": len({(t, s) for t, s, _ in raw}) == len(raw) and sorted(raw) == sorted(tb_raw(ref)),
    }


def faults(kind: str, kills: int, rng: random.Random, work: Path) -> dict[str, Any]:
    ref, got, log = work / f"{kind}-ref", work / f"{kind}-faults", work / f"{kind}.log"
    t0 = time.perf_counter()
    setup_s: list[float] = []
    rc, _ = run(command(kind, ref), log, setup=setup_s)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{kind}: the reference run failed (exit {rc}); see {log}")
    setup = setup_s[0] if setup_s else 0.0
    work_s = wall - setup  # a kill during the setup (imports, models) only restarts: kills are drawn over the work
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
            left = 1.0 - (done_fraction(kind, got) if "--resume" in cmd else 0.0)
            rc, what = run(cmd, log, kill_after=rng.uniform(0.0, 0.95 * work_s * left))
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
    return {"kind": kind, "kills": kills, "reference_wall_s": round(wall, 1), "reference_setup_s": round(setup, 1),
            **counts,
            "identical": compare(ref, got)}


# ------------------------------------------------------------------------------------- probes
EVIL = ("open({marker!r}, 'w').close()\n"
        "def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
        "compute_score = reward_func = make_env = f\n")
EXITS = ("import os\ndef exits(prompts, completions, trainer_state, **kw):\n"
         "    if trainer_state.global_step >= 1:\n        os._exit(0)\n    return [0.5] * len(completions)\n")


def set_key(key: str, value: Any) -> Any:
    """A tampering: ``config.yaml`` of the copied run folder sets ``key`` to ``value``."""
    def tamper(run_dir: Path, work: Path) -> None:
        import yaml

        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        saved[key] = value
        (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    return tamper


def forge_env_state(key: str, value: Any) -> Any:
    """A tampering: the gym checkpoint's ``state.json`` sets ``TimeLimit.<key>`` of environment 0,
    and ``COMPLETE`` is rewritten to match, as a forger would."""
    def tamper(run_dir: Path, work: Path) -> None:
        from reinforcepp.run.checkpoint import MARKER, CheckpointManager, manifest

        latest = CheckpointManager(run_dir).latest()
        assert latest is not None
        doc = json.loads((latest / "state.json").read_text())
        doc["state"]["envs"][0][0]["data"][key] = value
        (latest / "state.json").write_text(json.dumps(doc))
        (latest / MARKER).write_text(json.dumps({"files": manifest(latest)}) + "\n")
    return tamper


def zeroed_model(work: Path) -> Path:
    """A copy of the LM reference run's reference model with every weight zero."""
    import shutil

    from safetensors.torch import load_file, save_file

    zeroed = work / "zeroed"
    if not zeroed.exists():
        shutil.copytree(work / "lm-ref" / "reference", zeroed)
        weights = zeroed / "model.safetensors"
        save_file({k: v * 0 for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    return zeroed


def zero_reference_copy(run_dir: Path, work: Path) -> None:
    import shutil

    shutil.copy(zeroed_model(work) / "model.safetensors", run_dir / "reference" / "model.safetensors")


def record_points_at_zeroed(run_dir: Path, work: Path) -> None:
    from reinforcepp.lm.models import weights_fingerprint

    zeroed = zeroed_model(work)
    record = {"path": str(zeroed), "sha256": weights_fingerprint(str(zeroed))}
    (run_dir / "reference.json").write_text(json.dumps(record))


def remove(name: str) -> Any:
    return lambda run_dir, work: (run_dir / name).unlink()


def cut_metrics(run_dir: Path, work: Path) -> None:
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))


def binary_config(run_dir: Path, work: Path) -> None:
    (run_dir / "config.yaml").write_bytes(bytes(range(256)))


def probes(work: Path) -> list[tuple[str, str, Any, list[str], int, str]]:
    """(name, run folder copied: lm / gym / none, tampering, command after ``reinforcepp``,
    expected exit code, words the one line must hold)."""
    evil, colon = work / "evil.py", work / "a:b" / "evil.py"
    lm = ["train", "--resume", "output_dir={run}", "total_steps=9"]
    gym = ["gym", "--output-dir", "{run}", "--resume", "total_env_steps=8192", "progress=false"]
    code = [(" leading space", f" {evil}:f"), ("verl: prefix", f"verl:{evil}:f"),
            ("verl: default function", f"verl:{evil}"),
            ("colon inside the path", f"{colon}:f"), ("slash in the function name", f"{evil}:f/g"),
            ("openrlhf: prefix", f"openrlhf:{evil}"), ("tab", f"\t{evil}:f"), ("module:function", "evil_module:f"),
            ("rm: a zeroed model", f"rm:{work / 'zeroed'}"), ("URL", "http://127.0.0.1:9/reward")]
    out: list[tuple[str, str, Any, list[str], int, str]] = []
    out += [(f"reward_funcs: {name}", "lm", set_key("reward_funcs", [value]), lm, 2, "sets reward_funcs=")
            for name, value in code]
    out += [(f"environment: {name}", "lm", set_key("environment", value), lm, 2, "sets environment=")
            for name, value in (("file.py:function", f"{evil}:make_env"), ("leading space", f" {evil}:make_env"))]
    out += [(f"{key}: a zeroed model", "lm", set_key(key, str(work / "zeroed")), lm, 2, f"sets {key}=")
            for key in ("model", "ref_model", "tokenizer", "critic_model")]
    out += [
        ("reference copy zeroed", "lm", zero_reference_copy, lm, 2, "does not hold the files recorded"),
        ("reference.json names another model", "lm", record_points_at_zeroed, lm, 2, "never chooses a model"),
        ("metrics.jsonl deleted", "lm", remove("metrics.jsonl"), lm, 2, "metrics.jsonl is missing"),
        ("metrics.jsonl cut to 3 rows", "lm", cut_metrics, lm, 2, "has no row for step 8"),
        ("config.yaml deleted", "lm", remove("config.yaml"), lm, 2, "config.yaml is missing"),
        ("config.yaml binary", "lm", binary_config, lm, 2, "not a text file"),
        ("env_id: module:Env-v0", "gym", set_key("env_id", "evil_module:Evil-v0"), gym, 2, "sets env_id="),
        ("env_kwargs: max_episode_steps=3", "gym", set_key("env_kwargs", {"max_episode_steps": 3}), gym, 2,
         "sets env_kwargs="),
        ("state.json: _max_episode_steps=3", "gym", forge_env_state("_max_episode_steps", 3), gym, 2,
         "TimeLimit._max_episode_steps=3"),
        ("state.json: an attribute of its own", "gym", forge_env_state("evil", 1), gym, 2,
         "TimeLimit.evil, which a fresh"),
        ("gym --eval: env_id module:Env-v0", "gym", set_key("env_id", "evil_module:Evil-v0"),
         ["gym", "--eval", "{run}"], 2,
         "eval: the run folder's config.yaml sets env_id="),
        ("gym metrics.jsonl deleted", "gym", remove("metrics.jsonl"), gym, 2, "metrics.jsonl is missing"),
        ("a reward that calls os._exit(0)", "none", None,
         ["train", "output_dir={run}", *LM_ARGS[:5], "total_steps=3", "save_every=1", "progress=false",
          f"reward_funcs={work / 'exits.py'}:exits"], 2, "called os._exit(0) while scoring"),
        ("kl_coef=inf", "none", None, ["train", "output_dir={run}", "kl_coef=inf"], 2,
         "kl_coef must be a finite number"),
        ("gym lr=1e30", "none", None, ["gym", "--env", "CartPole-v1", "--output-dir", "{run}", "total_env_steps=4096",
                                       "lr=1e30",
                                       "progress=false", "tensorboard=false"], 1, "training diverged"),
    ]
    return out


def run_probes(work: Path) -> list[dict[str, Any]]:
    """Each probe on a fresh copy of the reference run folder it names (:func:`probes`)."""
    import shutil

    marker = work / "PLANTED_CODE_RAN"
    for path in (work / "evil.py", work / "a:b" / "evil.py", work / "evil_module.py"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(EVIL.format(marker=str(marker)))
    (work / "exits.py").write_text(EXITS)
    zeroed_model(work)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{work}", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for i, (name, base, tamper, argv, code, words) in enumerate(probes(work)):
        run_dir = work / f"probe-{i:02d}"
        if base != "none":
            shutil.copytree(work / f"{base}-ref", run_dir)
            tamper(run_dir, work)
        argv = [a.format(run=run_dir) for a in argv]
        proc = subprocess.run([sys.executable, "-m", "reinforcepp.cli", *argv], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        line = lines[-1] if lines else ""
        result = {"probe": name, "exit": proc.returncode, "expected_exit": code, "line": line[:300],
                  "one_line": "Traceback" not in proc.stderr and line.startswith("reinforcepp "),
                  "planted_code_ran": marker.exists(),
                  "as_expected": (proc.returncode == code and words in line and "Traceback" not in proc.stderr
                                  and not marker.exists())}
        if name.startswith("a reward that calls"):  # the checkpoint before the exit is intact
            from reinforcepp.run import CheckpointManager

            kept = CheckpointManager(run_dir).latest_intact()
            result["as_expected"] &= kept == run_dir / "checkpoints" / "step_00000001"
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="kills per run kind")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--only", choices=("lm", "gym", "probes"), default=None)
    parser.add_argument("--work", default="runs/faults", help="scratch folder (emptied first)")
    args = parser.parse_args()
    import shutil

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    ok = True
    for kind in ([args.only] if args.only in ("lm", "gym") else [] if args.only else ["lm", "gym"]):
        result = faults(kind, args.kills, rng, work)
        print(json.dumps(result), flush=True)
        ok &= all(result["identical"].values())
    if args.only in (None, "probes"):
        for kind in ("lm", "gym"):
            if not (work / f"{kind}-ref").exists():  # --only probes: the finished runs the probes tamper with
                rc, _ = run(command(kind, work / f"{kind}-ref"), work / f"{kind}.log")
                if rc != 0:
                    raise SystemExit(f"{kind}: the reference run failed (exit {rc})")
        results = run_probes(work)
        summary = {"kind": "probes", "probes": len(results), "as_expected": sum(r["as_expected"] for r in results),
                   "one_line": sum(r["one_line"] for r in results),
                   "planted_code_ran": sum(r["planted_code_ran"] for r in results)}
        print(json.dumps(summary), flush=True)
        ok &= summary["as_expected"] == len(results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
