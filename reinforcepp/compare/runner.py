"""The runs of ``reinforcepp compare``: their configs, the child processes, and loading them back.

Configs: :func:`overrides_for_run` (compare's defaults, the Gymnasium presets, the user's
``key=value`` items), :func:`build_config` (validates them), :func:`pinned_overrides` (the whole
resolved config, so that a preset edited mid-comparison changes nothing), :func:`resolved_summary`
(the settings that differ between estimators), :func:`parse_variant` and :func:`run_name`.
Processes: :func:`run_compare` starts one child per (estimator, seed), one after the other, as
``python -m reinforcepp.compare SPEC`` (the package's ``__main__``), which calls :func:`child_main`;
the child trains and writes its timings and memory numbers (:mod:`.memory`) to
``compare_run.json``. :func:`load_runs` reads the finished runs back.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

# The tuned settings of docs/gym.md (shared with benchmarks/gym_targets.py), applied to Gymnasium
# runs unless --no-presets: without them gae would run without its reward normalisation and
# LunarLander with gamma 0.99 for both estimators.
from ..gym.presets import PRESETS as GYM_PRESETS
from .memory import peak_rss_mb, proc_status_mb, reset_peak_rss, state_mb
from .stats import RunData

RESULT_FILE = "compare_run.json"
SPEC_FILE = "compare.json"

# Defaults compare sets on every run (a key=value override wins).
LM_DEFAULTS: dict[str, Any] = dict(progress=False, tensorboard=False, torch_threads=1, log_samples_every=0)
GYM_DEFAULTS: dict[str, Any] = dict(progress=False, tensorboard=False, torch_threads=1)

OWN_DATA_KEYS = ("train_data", "eval_data")


# ------------------------------------------------------------------------------ run configs
def own_data(overrides: Sequence[str]) -> Optional[str]:
    """The data a comparison runs on when the overrides name it (train_data, else eval_data)."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    return next((given[k] for k in OWN_DATA_KEYS if given.get(k) not in (None, "", "None", "none")), None)


def overrides_for_run(mode: str, target: str, estimator: str, seed: int, steps: Optional[int], run_dir: Path,
                      overrides: list[str], presets: bool) -> list[str]:
    """The ``key=value`` items of one run: compare's defaults, then (Gymnasium, ``presets``) the tuned
    settings of :data:`GYM_PRESETS`, then the run's own keys, then ``overrides`` (which win)."""
    if mode == "lm":
        base = {**LM_DEFAULTS, "estimator": estimator, "seed": seed, "output_dir": str(run_dir)}
        if not own_data(overrides):
            base["task"] = target
        if steps is not None:
            base["total_steps"] = steps
    else:
        preset = GYM_PRESETS.get((target, estimator), {}) if presets else {}
        base = {**GYM_DEFAULTS, **preset, "env_id": target, "estimator": estimator, "seed": seed,
                "output_dir": str(run_dir)}
        if steps is not None:
            base["total_env_steps"] = steps
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in base.items()] + list(overrides)


def pinned_overrides(cfg) -> list[str]:
    """Every field of ``cfg`` as ``key=value`` (lists and mappings as JSON). Empty mappings are
    left out: ``Config`` does not turn the string ``{}`` back into a dict for a field typed
    plain ``dict`` (GymConfig.env_kwargs), and an empty mapping is every such field's default."""
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) or v is None else v}"
            for k, v in cfg.to_dict().items() if v != {}]


def build_config(mode: str, overrides: list[str]):
    """The validated config of one run (``LMConfig`` or ``GymConfig``); raises ConfigError."""
    if mode == "lm":
        from ..lm.cli import build_config as build_lm_config

        return build_lm_config(None, overrides)
    from ..gym.config import GymConfig

    return GymConfig.load(None, overrides)


def resolved_summary(mode: str, cfg) -> str:
    """One line of the settings that differ between estimators, for the report."""
    if mode == "lm":
        from ..core import get_estimator

        spec = get_estimator(cfg.estimator)
        critic = f"critic (lr {cfg.critic_lr}, lam {cfg.lam})" if spec.needs_critic else "no critic"
        return (f"KL in `{cfg.resolved_kl_placement}` ({cfg.resolved_kl_estimator}, beta {cfg.kl_coef}), "
                f"loss `{cfg.resolved_loss_agg}`, gamma {cfg.gamma}, {critic}, "
                f"{cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples, lr {cfg.lr}, "
                f"{cfg.sft_steps} warm-start steps")
    crit = "critic" if cfg.estimator == "gae" else "no critic"
    return (f"{crit}, gamma {cfg.gamma}" + (f", lam {cfg.lam}" if cfg.estimator == "gae" else "") +
            f", {cfg.num_envs} envs x {cfg.steps_per_env} steps, {cfg.epochs} epochs, "
            f"mini-batch {cfg.mini_batch_size}, lr {cfg.lr} ({cfg.lr_schedule}), "
            f"entropy_coef {cfg.entropy_coef}, normalize_reward {cfg.normalize_reward}, "
            f"normalize_obs {cfg.normalize_obs}")


def run_name(estimator: str, seed: int) -> str:
    """The run's directory name: the ``--estimators`` entry made safe for a path, then ``_s<seed>``."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", estimator) + f"_s{seed}"


def parse_variant(entry: str) -> tuple[str, list[str]]:
    """``"grpo[a=1;b=2]"`` -> ``("grpo", ["a=1", "b=2"])``; ``"grpo"`` -> ``("grpo", [])``."""
    m = re.fullmatch(r"([^\[\]]+)(?:\[([^\[\]]*)\])?", entry)
    if m is None:
        raise ValueError(f"--estimators entry {entry!r}: expected NAME or NAME[key=value;key=value]")
    extra = [kv.strip() for kv in (m.group(2) or "").split(";") if kv.strip()]
    for kv in extra:
        if "=" not in kv:
            raise ValueError(f"--estimators entry {entry!r}: {kv!r} is not key=value")
    return m.group(1), extra


# ------------------------------------------------------------------------------- the runs
def load_runs(out: Path, spec: dict) -> tuple[list[RunData], list[dict]]:
    """The finished runs of ``spec`` under ``out/runs`` (order: estimators, then seeds) and the failed ones."""
    from ..run import read_metrics

    runs, failed = [], []
    for est in spec["estimators"]:
        for seed in spec["seeds"]:
            d = out / "runs" / run_name(est, seed)
            res_path = d / RESULT_FILE
            if not res_path.exists():
                failed.append({"estimator": est, "seed": seed, "error": f"no {RESULT_FILE} (the run did not finish)"})
                continue
            res = json.loads(res_path.read_text())
            if res.get("status") != "ok":
                failed.append({"estimator": est, "seed": seed, "error": res.get("error", "failed")})
                continue
            runs.append(RunData(est, seed, read_metrics(d), res))
    return runs, failed


def run_compare(spec: dict, out: Path, log=print) -> None:
    """Run every (estimator, seed) of ``spec`` one after the other, each in a subprocess.
    A run whose ``compare_run.json`` says ok for the same overrides is kept, not re-run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    total = len(spec["seeds"]) * len(spec["estimators"])
    done = 0
    for seed in spec["seeds"]:
        for est in spec["estimators"]:
            done += 1
            name = run_name(est, seed)
            run_dir = out / "runs" / name
            overrides = spec["run_overrides"][name]
            res_path = run_dir / RESULT_FILE
            if res_path.exists():
                old = json.loads(res_path.read_text())
                if old.get("status") == "ok" and old.get("overrides") == overrides:
                    log(f"[{done}/{total}] {name}: already done, kept")
                    continue
            shutil.rmtree(run_dir, ignore_errors=True)  # the trainers append to metrics.jsonl: start clean
            run_dir.mkdir(parents=True)
            child_spec = out / "logs" / f"{name}.json"
            child_spec.parent.mkdir(parents=True, exist_ok=True)
            child_spec.write_text(json.dumps({"mode": spec["mode"], "overrides": overrides, "result": str(res_path)}))
            log(f"[{done}/{total}] {name} ...")
            t0 = time.perf_counter()
            with open(out / "logs" / f"{name}.log", "w") as logf:
                # the package's __main__: child_main(SPEC)
                proc = subprocess.run([sys.executable, "-m", "reinforcepp.compare", str(child_spec)], stdout=logf,
                                      stderr=subprocess.STDOUT, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0 or not res_path.exists():
                tail = (out / "logs" / f"{name}.log").read_text().strip().splitlines()[-1:] or ["?"]
                res = {"status": "failed", "overrides": overrides,
                       "error": f"exit code {proc.returncode}: {tail[0][:300]}", "wall_s": wall}
                log(f"[{done}/{total}] {name}: FAILED ({res['error']}); log: {out / 'logs' / (name + '.log')}")
            else:
                res = json.loads(res_path.read_text())
                res["wall_s"] = wall
                log(f"[{done}/{total}] {name}: {wall:.0f} s, peak RSS {res['peak_rss_mb']:.0f} MB")
            res_path.write_text(json.dumps(res, indent=1))


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def child_main(spec_path: str) -> int:
    """Child process: train one run, then write its timings and its own memory numbers."""
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    mode, overrides = spec["mode"], spec["overrides"]
    trainer_cls: Any
    if mode == "lm":
        from ..lm.trainer import Trainer as trainer_cls
    else:
        from ..gym.trainer import GymTrainer as trainer_cls
    base_rss = proc_status_mb("VmRSS")
    t_import = time.perf_counter()
    cfg = build_config(mode, overrides)
    trainer = trainer_cls(cfg)
    t_setup = time.perf_counter()
    reset = reset_peak_rss()
    load_start = _load_average()
    try:
        trainer.train()
    finally:
        if mode == "gym":
            trainer.close()
    t_train = time.perf_counter()
    peak_mb = peak_rss_mb()
    result = {"status": "ok", "overrides": overrides, "import_s": t_import - t_start, "setup_s": t_setup - t_import,
              "train_s": t_train - t_setup, "base_rss_mb": base_rss, "peak_rss_mb": peak_mb,
              "train_peak_rss_mb": proc_status_mb("VmHWM") if reset else math.nan, "state_mb": state_mb(trainer),
              "load_start": load_start, "load_end": _load_average()}
    Path(spec["result"]).write_text(json.dumps(result, indent=1))
    return 0
