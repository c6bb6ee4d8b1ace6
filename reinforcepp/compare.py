"""``reinforcepp compare``: several estimators x seeds on one task, then one report.

    reinforcepp compare --task reverse --estimators reinforce_pp,reinforce_pp_baseline,grpo,rloo,gae --seeds 3
    reinforcepp compare --env CartPole-v1 --estimators reinforce_pp,gae --seeds 3 --out /tmp/cmp_cartpole
    reinforcepp compare --task sort --estimators reinforce_pp,grpo --steps 100 lr=1e-4    # key=value: every run
    reinforcepp compare --report-only /tmp/cmp_cartpole                                  # rebuild the report
    reinforcepp compare --task sort --estimators "grpo,grpo[kl_estimator=k3+;kl_placement=loss]"  # variants

An entry of ``--estimators`` may carry its own ``key=value`` settings in brackets, separated by
``;`` (``grpo[importance_sampling_level=sequence;eps_low=3e-4]``): a variant of that estimator,
labelled by the whole entry, so that one report shows an option's effect.

Every (estimator, seed) run is a fresh subprocess, started one after the other (never two at
once), seeds in the outer loop so that a drift in machine load hits every estimator alike. The
parent validates every run's config first and pins it whole (a preset edited while the
comparison runs changes nothing). The child trains with one torch thread and writes
``OUT/runs/<estimator>_s<seed>/compare_run.json``: its timings, its own peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``, so the number belongs to that run alone; the parent's
``RUSAGE_CHILDREN`` would be a maximum over all children), the peak of the training loop alone,
the resident memory after the imports, and the exact bytes of the tensors the trainer keeps.
The parent then writes ``report.md`` and ``compare.png``: mean and sample std over seeds of each
curve, a table per estimator, the ratios ``reinforce_pp / gae`` and a "Claims" section whose
verdicts come from the explicit rules in :data:`RULES`. ``docs/compare.md`` explains every number.

Every estimator keeps its own defaults (for language models: KL placement ``reward`` for
``reinforce_pp`` and ``gae``, ``loss`` for the group estimators; the report lists them).
Gymnasium runs start from the tuned per-(environment, estimator) settings of ``docs/gym.md``
(:data:`GYM_PRESETS`) when there is one; ``--no-presets`` turns them off; ``key=value`` wins over both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

# The tuned settings of docs/gym.md (shared with benchmarks/gym_targets.py), applied to Gymnasium
# runs unless --no-presets: without them gae would run without its reward normalisation and
# LunarLander with gamma 0.99 for both estimators.
from .gym.presets import PRESETS as GYM_PRESETS

RESULT_FILE = "compare_run.json"
SPEC_FILE = "compare.json"


# Defaults compare sets on every run (a key=value override wins).
LM_DEFAULTS: dict[str, Any] = dict(progress=False, tensorboard=False, torch_threads=1, log_samples_every=0)
GYM_DEFAULTS: dict[str, Any] = dict(progress=False, tensorboard=False, torch_threads=1)


# ---------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (divisor ``n - 1``) of the finite ``values``.
    ``(nan, nan)`` when there are none; the std is ``nan`` for a single value (no spread known)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def series(rows: Sequence[dict], key: str, kind: str = "train") -> list[tuple[float, float]]:
    """``(step, value)`` of the rows of ``kind`` that logged a finite ``key``, in order."""
    out = []
    for r in rows:
        v = r.get(key)
        if r.get("kind", "train") == kind and isinstance(v, (int, float)) and math.isfinite(v):
            out.append((r["step"], float(v)))
    return out


def window(values: Sequence[float], frac: float = 0.1, end: bool = True) -> float:
    """Mean of the last (``end``) or first ``max(1, ceil(frac * n))`` values; nan if none."""
    if not values:
        return math.nan
    w = max(1, math.ceil(frac * len(values)))
    part = values[-w:] if end else values[:w]
    return sum(part) / len(part)


def aggregate_curves(per_seed: Sequence[Sequence[dict]], key: str, kind: str = "train") -> tuple[list[float], list[float], list[float], list[int]]:
    """Across seeds, at each step logged by at least one seed: mean, sample std (nan for one
    seed) and count of the seeds that logged ``key`` at that step. Returns
    ``(steps, means, stds, counts)`` sorted by step."""
    by_step: dict[float, list[float]] = {}
    for rows in per_seed:
        for step, v in series(rows, key, kind):
            by_step.setdefault(step, []).append(v)
    steps = sorted(by_step)
    stats = [mean_std(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats], [len(by_step[s]) for s in steps]


def _last(rows: Sequence[dict], key: str, kind: str) -> float:
    s = series(rows, key, kind)
    return s[-1][1] if s else math.nan


def _first(rows: Sequence[dict], key: str, kind: str) -> float:
    s = series(rows, key, kind)
    return s[0][1] if s else math.nan


def _train_window(rows: Sequence[dict], key: str, end: bool = True) -> float:
    return window([v for _, v in series(rows, key, "train")], end=end)


def _median(values: Sequence[float]) -> float:
    xs = sorted(v for v in values if math.isfinite(v))
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def _median_step_time(rows: Sequence[dict], phases: Sequence[str]) -> float:
    """Median over train rows of the summed ``time/<phase>``: the median ignores the steps
    that also paid for an evaluation."""
    totals = [sum(r.get(f"time/{p}", 0.0) for p in phases) for r in rows if r.get("kind", "train") == "train" and any(f"time/{p}" in r for p in phases)]
    return _median(totals)


# ------------------------------------------------------------------------- per-run summaries
@dataclass(frozen=True)
class Stat:
    """One number per run, aggregated over seeds in the report's tables."""

    key: str
    label: str
    fmt: str
    fn: Callable[[Sequence[dict], dict], float]
    """``fn(metrics_rows, run_result) -> value``"""


def _gap_lm(rows, _res):
    held = _last(rows, "eval/sampled_reward_mean", "eval")
    if not math.isfinite(held):
        held = _last(rows, "eval/reward_mean", "eval")
    return _train_window(rows, "reward/mean") - held


def _cost_stats(step_phases: Sequence[str]) -> list[Stat]:
    return [
        Stat("wall_s", "wall time of the run (s)", ".1f", lambda rows, res: res.get("wall_s", math.nan)),
        Stat("train_s", "training loop (s)", ".1f", lambda rows, res: res.get("train_s", math.nan)),
        Stat("step_s", "median step time (s): " + "+".join(step_phases), ".3f", lambda rows, res: _median_step_time(rows, step_phases)),
        Stat("peak_rss_mb", "peak RSS, whole run (MB)", ".0f", lambda rows, res: res.get("peak_rss_mb", math.nan)),
        Stat("train_peak_rss_mb", "peak RSS, training loop (MB)", ".0f", lambda rows, res: res.get("train_peak_rss_mb", math.nan)),
        Stat("base_rss_mb", "RSS after imports (MB)", ".0f", lambda rows, res: res.get("base_rss_mb", math.nan)),
        Stat("state_mb", "models + grads + optimizer state (MB)", ".2f", lambda rows, res: res.get("state_mb", math.nan)),
        Stat("load", "machine load (1-min load average, mean of start and end)", ".1f", lambda rows, res: 0.5 * (res.get("load_start", math.nan) + res.get("load_end", math.nan))),
    ]


LM_STATS: list[Stat] = [
    Stat("acc_final", "held-out accuracy, final (greedy)", ".3f", lambda rows, res: _last(rows, "eval/accuracy", "eval")),
    Stat("acc_start", "held-out accuracy, first eval", ".3f", lambda rows, res: _first(rows, "eval/accuracy", "eval")),
    Stat("reward_end", "train reward, end", ".3f", lambda rows, res: _train_window(rows, "reward/mean")),
    Stat("heldout_reward", "held-out reward, final (sampled)", ".3f", lambda rows, res: (lambda v: v if math.isfinite(v) else _last(rows, "eval/reward_mean", "eval"))(_last(rows, "eval/sampled_reward_mean", "eval"))),
    Stat("gap", "train - held-out reward gap", "+.3f", _gap_lm),
    Stat("kl_end", "KL per token, end", ".4f", lambda rows, res: _train_window(rows, "kl/mean_token")),
    Stat("kl_growth", "KL growth (end - start)", "+.4f", lambda rows, res: _train_window(rows, "kl/mean_token") - _train_window(rows, "kl/mean_token", end=False)),
    Stat("length_end", "response length, end", ".2f", lambda rows, res: _train_window(rows, "response/length_mean")),
    Stat("entropy_end", "entropy, end", ".3f", lambda rows, res: _train_window(rows, "entropy")),
    *_cost_stats(("generate", "score", "forward", "update")),
]

GYM_STATS: list[Stat] = [
    Stat("eval_final", "deterministic eval return, final", ".1f", lambda rows, res: _last(rows, "eval/return_mean", "eval")),
    Stat("eval_best", "deterministic eval return, best", ".1f", lambda rows, res: max((v for _, v in series(rows, "eval/return_mean", "eval")), default=math.nan)),
    Stat("return_end", "training episode return, end", ".1f", lambda rows, res: _train_window(rows, "episode/return_mean")),
    Stat("gap", "training - eval return", "+.1f", lambda rows, res: _train_window(rows, "episode/return_mean") - _last(rows, "eval/return_mean", "eval")),
    Stat("approx_kl_end", "approx KL(old, new) per update, end", ".4f", lambda rows, res: _train_window(rows, "approx_kl")),
    Stat("length_end", "episode length, end", ".1f", lambda rows, res: _train_window(rows, "episode/length_mean")),
    Stat("entropy_end", "entropy, end", ".3f", lambda rows, res: _train_window(rows, "entropy")),
    *_cost_stats(("rollout", "advantages", "update")),
]

# (metric, kind, panel title)
LM_PANELS = [
    ("reward/mean", "train", "train reward (sampled)"),
    ("eval/accuracy", "eval", "held-out accuracy (greedy)"),
    ("kl/mean_token", "train", "KL to reference, per token"),
    ("response/length_mean", "train", "response length (tokens)"),
    ("entropy", "train", "entropy (nats / token)"),
    ("eval/sampled_reward_mean", "eval", "held-out reward (sampled)"),
]
GYM_PANELS = [
    ("episode/return_mean", "train", "training episode return"),
    ("eval/return_mean", "eval", "deterministic eval return"),
    ("approx_kl", "train", "approx KL(old, new) per update (no reference)"),
    ("episode/length_mean", "train", "episode length"),
    ("entropy", "train", "entropy (nats / step)"),
]

TABLE_LEARNING = {"lm": ["acc_final", "acc_start", "reward_end", "heldout_reward", "gap", "kl_end", "kl_growth", "length_end", "entropy_end"],
                  "gym": ["eval_final", "eval_best", "return_end", "gap", "approx_kl_end", "length_end", "entropy_end"]}
TABLE_COST = ["wall_s", "train_s", "step_s", "peak_rss_mb", "train_peak_rss_mb", "base_rss_mb", "state_mb", "load"]
RATIO_KEYS = ["wall_s", "train_s", "step_s", "peak_rss_mb", "train_peak_rss_mb", "state_mb"]


def stats_for(mode: str) -> list[Stat]:
    return LM_STATS if mode == "lm" else GYM_STATS


@dataclass
class RunData:
    estimator: str
    seed: int
    rows: list[dict]
    result: dict
    """the child's ``compare_run.json`` (+ ``wall_s`` measured by the parent)"""


@dataclass
class EstimatorSummary:
    estimator: str
    seeds: list[int]
    per_seed: dict[str, list[float]] = field(default_factory=dict)
    """stat key -> one value per seed (in ``seeds`` order)"""

    def mean_std(self, key: str) -> tuple[float, float]:
        return mean_std(self.per_seed.get(key, []))


def summarize(runs: Sequence[RunData], mode: str) -> dict[str, EstimatorSummary]:
    """Per estimator (in first-seen order): every :class:`Stat` of every seed."""
    out: dict[str, EstimatorSummary] = {}
    for run in runs:
        s = out.setdefault(run.estimator, EstimatorSummary(run.estimator, []))
        s.seeds.append(run.seed)
        for st in stats_for(mode):
            s.per_seed.setdefault(st.key, []).append(float(st.fn(run.rows, run.result)))
    return out


def ratio(summaries: dict[str, EstimatorSummary], key: str, num: str = "reinforce_pp", den: str = "gae") -> float:
    """``mean over seeds of num / mean over seeds of den`` (a ratio of means)."""
    if num not in summaries or den not in summaries:
        return math.nan
    a, _ = summaries[num].mean_std(key)
    b, _ = summaries[den].mean_std(key)
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


# --------------------------------------------------------------------------------------- claims
RULES = {
    "ratio": "ratio of means r = REINFORCE++ / PPO (gae), and the paired ratios of each seed (the two runs of a seed ran one after the other, "
             "under the same machine load): HOLDS if r <= 0.95 and every paired ratio < 1, DOES NOT HOLD if r >= 1.05 and every paired ratio > 1, "
             "INCONCLUSIVE otherwise (timings and RSS on a shared machine move by several percent from run to run)",
    "interval": "mean +- std over seeds of each estimator: HOLDS if REINFORCE++'s whole interval lies below GRPO's, "
                "DOES NOT HOLD if it lies above, INCONCLUSIVE if the intervals overlap or a side has fewer than 2 seeds",
    "spread": "s = std over seeds of the final held-out accuracy: HOLDS if s(REINFORCE++) <= 0.8 s(GRPO), "
              "DOES NOT HOLD if s(REINFORCE++) >= 1.25 s(GRPO), INCONCLUSIVE in between, when both are 0, or with fewer than 2 seeds",
}


@dataclass
class Claim:
    name: str
    statement: str
    rule: str
    verdict: str
    evidence: str


def verdict_ratio(r: float, paired: Sequence[float] = ()) -> str:
    """Ratio rule of :data:`RULES`: ``r`` the ratio of means, ``paired`` the per-seed ratios."""
    if not math.isfinite(r) or not all(math.isfinite(p) for p in paired):
        return "INCONCLUSIVE"
    if r <= 0.95 and all(p < 1 for p in paired):
        return "HOLDS"
    if r >= 1.05 and all(p > 1 for p in paired):
        return "DOES NOT HOLD"
    return "INCONCLUSIVE"


def paired_ratios(summaries: dict[str, EstimatorSummary], key: str, num: str = "reinforce_pp", den: str = "gae") -> list[float]:
    """``num / den`` of ``key`` for each seed that both estimators ran, in seed order."""
    if num not in summaries or den not in summaries:
        return []
    a = dict(zip(summaries[num].seeds, summaries[num].per_seed.get(key, [])))
    b = dict(zip(summaries[den].seeds, summaries[den].per_seed.get(key, [])))
    return [a[s] / b[s] if b[s] else math.nan for s in sorted(set(a) & set(b))]


def verdict_interval(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Lower is better; ``a`` is REINFORCE++, ``b`` the baseline (mean, std)."""
    (ma, sa), (mb, sb) = a, b
    if not all(math.isfinite(x) for x in (ma, sa, mb, sb)):
        return "INCONCLUSIVE"
    if ma + sa < mb - sb:
        return "HOLDS"
    if ma - sa > mb + sb:
        return "DOES NOT HOLD"
    return "INCONCLUSIVE"


def verdict_spread(sa: float, sb: float) -> str:
    if not (math.isfinite(sa) and math.isfinite(sb)) or (sa == 0 and sb == 0):
        return "INCONCLUSIVE"
    if sa <= 0.8 * sb:
        return "HOLDS"
    if sa >= 1.25 * sb:
        return "DOES NOT HOLD"
    return "INCONCLUSIVE"


def _pm(ms: tuple[float, float], fmt: str) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "n/a"
    return f"{m:{fmt}} ± {s:{fmt.lstrip('+')}}" if math.isfinite(s) else f"{m:{fmt}}"


def claims(summaries: dict[str, EstimatorSummary], mode: str) -> list[Claim]:
    """The paper's claims that this comparison can test, each with a verdict by :data:`RULES`."""
    out: list[Claim] = []
    rpp, gae, grpo = (summaries.get(n) for n in ("reinforce_pp", "gae", "grpo"))
    missing = lambda *names: "NOT TESTED: " + ", ".join(n for n in names if n not in summaries) + " not in this comparison"  # noqa: E731
    for key, statement, what, fmt in (
        ("train_s", "REINFORCE++ trains in less time than PPO with a critic (no critic forward/backward)", "training-loop time (s)", ".1f"),
        ("train_peak_rss_mb", "REINFORCE++ needs less memory than PPO with a critic, as measured", "peak RSS of the training loop (MB)", ".0f"),
        ("state_mb", "REINFORCE++ keeps less model state than PPO with a critic (no critic weights, gradients, optimizer state)", "models + grads + optimizer state (MB)", ".2f"),
    ):
        if rpp is None or gae is None:
            out.append(Claim(what, statement, RULES["ratio"], missing("reinforce_pp", "gae"), ""))
            continue
        r = ratio(summaries, key)
        paired = paired_ratios(summaries, key)
        extra = ""
        if key == "train_peak_rss_mb":
            extra = f"; whole-run peak RSS ratio {ratio(summaries, 'peak_rss_mb'):.3f}, both on top of ~{rpp.mean_std('base_rss_mb')[0]:.0f} MB that the imports alone take"
        elif key == "train_s":
            extra = f"; median step-time ratio {ratio(summaries, 'step_s'):.3f}, whole-run wall-time ratio {ratio(summaries, 'wall_s'):.3f}"
        out.append(Claim(what.split(" (")[0], statement, RULES["ratio"], verdict_ratio(r, paired),
                         f"{what}: REINFORCE++ {_pm(rpp.mean_std(key), fmt)}, gae {_pm(gae.mean_std(key), fmt)}, ratio {r:.3f} "
                         f"(per seed: {', '.join(f'{p:.3f}' for p in paired)}){extra}"))
    if mode != "lm":
        out.append(Claim("stability vs GRPO", "REINFORCE++ is more stable than GRPO", "", "NOT TESTED: GRPO needs several samples of one prompt; a Gymnasium reset draws a new start state", ""))
        return out
    if rpp is None or grpo is None:
        for name in ("KL growth", "seed spread", "train vs held-out gap"):
            out.append(Claim(name, f"REINFORCE++ beats GRPO on {name}", "", missing("reinforce_pp", "grpo"), ""))
        return out
    a, b = rpp.mean_std("kl_growth"), grpo.mean_std("kl_growth")
    out.append(Claim("KL growth", "REINFORCE++'s KL to the reference grows less than GRPO's", RULES["interval"], verdict_interval(a, b),
                     f"KL growth per token (end - start): REINFORCE++ {_pm(a, '+.4f')}, GRPO {_pm(b, '+.4f')}; KL at the end {_pm(rpp.mean_std('kl_end'), '.4f')} vs {_pm(grpo.mean_std('kl_end'), '.4f')}"))
    sa, sb = rpp.mean_std("acc_final")[1], grpo.mean_std("acc_final")[1]
    out.append(Claim("seed spread", "REINFORCE++'s results vary less across seeds than GRPO's", RULES["spread"], verdict_spread(sa, sb),
                     f"std over {len(rpp.seeds)} / {len(grpo.seeds)} seeds of the final held-out accuracy: REINFORCE++ {sa:.3f}, GRPO {sb:.3f} "
                     f"(means {rpp.mean_std('acc_final')[0]:.3f} vs {grpo.mean_std('acc_final')[0]:.3f})"))
    a, b = rpp.mean_std("gap"), grpo.mean_std("gap")
    out.append(Claim("train vs held-out gap", "REINFORCE++ overfits the training prompts less than GRPO (smaller train - held-out reward gap)", RULES["interval"], verdict_interval(a, b),
                     f"train reward (end) - held-out sampled reward (final): REINFORCE++ {_pm(a, '+.3f')}, GRPO {_pm(b, '+.3f')}"))
    return out


# ---------------------------------------------------------------------------------------- plot
def plot_compare(runs: Sequence[RunData], mode: str, out: Path, title: str) -> Path:
    """One panel per metric: per estimator the mean over seeds and a +-std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = LM_PANELS if mode == "lm" else GYM_PANELS
    estimators = list(dict.fromkeys(r.estimator for r in runs))
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.1 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, kind, label) in zip(axes.flat, panels):
        for i, est in enumerate(estimators):
            per_seed = [r.rows for r in runs if r.estimator == est]
            steps, means, stds, _ = aggregate_curves(per_seed, key, kind)
            if not steps:
                continue
            c = colors[i % len(colors)]
            ax.plot(steps, means, "-" if kind == "train" else "o-", color=c, lw=1.3, ms=2.5, label=f"{est} (n={len(per_seed)})")
            lo = [m - (s if math.isfinite(s) else 0.0) for m, s in zip(means, stds)]
            hi = [m + (s if math.isfinite(s) else 0.0) for m, s in zip(means, stds)]
            ax.fill_between(steps, lo, hi, color=c, alpha=0.18, lw=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step" if mode == "lm" else "environment steps", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title + "  (line: mean over seeds, band: +- sample std)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -------------------------------------------------------------------------------------- report
def _fmt(v: float, fmt: str) -> str:
    return f"{v:{fmt}}" if math.isfinite(v) else "n/a"


def build_report(spec: dict, runs: Sequence[RunData], failed: Sequence[dict], report_dir: Path) -> Path:
    """Write ``report_dir/report.md`` and ``report_dir/compare.png``; returns the Markdown path."""
    mode = spec["mode"]
    report_dir.mkdir(parents=True, exist_ok=True)
    title = f"{spec['target']} ({'language model' if mode == 'lm' else 'Gymnasium'})"
    png = plot_compare(runs, mode, report_dir / "compare.png", title) if runs else None
    summaries = summarize(runs, mode)
    stat_by_key = {s.key: s for s in stats_for(mode)}
    L: list[str] = [f"# Estimator comparison: {title}", ""]
    L += ["Made by:", "", "```bash", spec["command"], "```", ""]
    unit = "RL steps" if mode == "lm" else "environment steps"
    L += [f"- estimators: {', '.join(spec['estimators'])}; seeds: {', '.join(map(str, spec['seeds']))}; {spec.get('steps_label', '')} {unit}".rstrip(),
          f"- overrides given to every run: `{' '.join(spec['overrides']) or '(none)'}`; compare's own defaults: `{' '.join(f'{k}={v}' for k, v in spec['compare_defaults'].items())}`",
          *([f"- Gymnasium presets (tuned settings of docs/gym.md, `GYM_PRESETS`): {'applied where one exists' if spec.get('presets') else 'off (--no-presets)'}"] if mode == "gym" else []),
          f"- machine: {spec['machine']}; runs one at a time, each in its own process, seeds in the outer loop",
          f"- started {spec['started']}, {len(runs)} runs finished, {len(failed)} failed", ""]
    L += ["Each estimator keeps its own defaults:", "", "| estimator | settings that differ between estimators |", "|---|---|"]
    for est in spec["estimators"]:
        L.append(f"| `{est}` | {spec['resolved'].get(est, '')} |")
    L.append("")
    if failed:
        L += ["**Failed runs** (not in the numbers below):", ""] + [f"- `{f['estimator']}` seed {f['seed']}: {f.get('error', '?')}" for f in failed] + [""]
    if png is not None:
        L += [f"![curves]({png.name})", ""]
    L += ["## Results (mean ± sample std over seeds)", ""]
    for name, keys in (("Learning and stability", TABLE_LEARNING[mode]), ("Cost", TABLE_COST)):
        L += [f"### {name}", "", "| estimator | seeds | " + " | ".join(stat_by_key[k].label for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
        for est, s in summaries.items():
            L.append(f"| `{est}` | {len(s.seeds)} | " + " | ".join(_pm(s.mean_std(k), stat_by_key[k].fmt) for k in keys) + " |")
        L.append("")
    if mode == "lm" and summaries:
        L += ["Seed spread (std of the final held-out accuracy over seeds): " + ", ".join(f"`{e}` {_fmt(s.mean_std('acc_final')[1], '.3f')}" for e, s in summaries.items()), ""]
    if "reinforce_pp" in summaries and "gae" in summaries:
        L += ["### Ratios REINFORCE++ / PPO with a critic (`reinforce_pp` / `gae`, ratio of means)", "", "| " + " | ".join(stat_by_key[k].label for k in RATIO_KEYS) + " |", "|" + "---|" * len(RATIO_KEYS)]
        L += ["| " + " | ".join(_fmt(ratio(summaries, k), ".3f") for k in RATIO_KEYS) + " |", ""]
    L += ["## Claims of the paper, tested at this small scale", ""]
    for c in claims(summaries, mode):
        L.append(f"- **{c.name}: {c.verdict}.** {c.statement}." + (f" {c.evidence}." if c.evidence else ""))
    L += ["", f"Scale: {len(spec['seeds'])} seeds of {spec.get('steps_label', '?')} {unit} on a CPU, with "
          + (("the given model" if any(o.startswith("model=") for o in spec["overrides"]) else "the tiny built-in model") if mode == "lm" else "small MLP policies") + ". The paper's claims are about large models on GPUs; "
          "a verdict here says whether the effect shows at this scale, not whether it holds at the paper's."]
    L += ["", "Rules (applied mechanically to the numbers above):", ""] + [f"- {k}: {v}." for k, v in RULES.items()] + [""]
    L += ["## How the numbers are made", ""]
    L += _definitions(mode) + [""]
    L += ["## Per seed", "", "| estimator | seed | " + " | ".join(stat_by_key[k].label for k in TABLE_LEARNING[mode] + ["wall_s", "peak_rss_mb"]) + " |",
          "|---|---|" + "---|" * (len(TABLE_LEARNING[mode]) + 2)]
    for est, s in summaries.items():
        for i, seed in enumerate(s.seeds):
            L.append(f"| `{est}` | {seed} | " + " | ".join(_fmt(s.per_seed[k][i], stat_by_key[k].fmt) for k in TABLE_LEARNING[mode] + ["wall_s", "peak_rss_mb"]) + " |")
    L += ["", f"Run directories: `{spec['out']}/runs/<estimator>_s<seed>/` (not committed). Rebuild this report with "
          f"`reinforcepp compare --report-only {spec['out']}`.", ""]
    path = report_dir / "report.md"
    path.write_text("\n".join(L))
    return path


def _definitions(mode: str) -> list[str]:
    common = [
        "- Curves: at each step, the mean and sample std (divisor n - 1) over the seeds that logged the metric at that step.",
        "- \"end\" of a training metric: the mean of its last 10 % of logged training rows (at least one); \"start\": its first 10 %. "
        "\"final\" of an evaluation metric: the last evaluation (at the end of training).",
        "- Time: wall time of the run's process as seen by the parent (imports, model set-up, warm start, training, evaluations, checkpoint); "
        "training loop = the trainer's `train()` call alone; median step time = median over training rows of the summed phase times (the median drops the steps that also ran an evaluation).",
        "- Memory: each run's own peak resident set size, whole run (`getrusage(RUSAGE_SELF).ru_maxrss` in the child process) and training loop alone "
        "(`VmHWM` after resetting it through `/proc/self/clear_refs` when `train()` starts: set-up transients excluded, every model resident), its RSS right after the imports, "
        "and the exact bytes of the tensors the trainer keeps (parameters and buffers of policy, reference and critic, gradients, optimizer state), the part that grows with the model.",
        "- Ratios are ratios of the means over seeds.",
    ]
    if mode == "lm":
        return common + [
            "- Train reward: mean scalar reward of the rollout's sampled responses (training prompts, the training temperature). "
            "Held-out accuracy: greedy responses on held-out prompts that earn the full reward. Held-out reward (sampled): mean reward of `eval_samples` samples per held-out prompt at `eval_temperature` (1.0, the training temperature), "
            "so train - held-out compares like with like: a positive gap means the policy does better on prompts it trained on.",
            "- KL per token: `kl/mean_token`. With KL in the reward (`reinforce_pp`, `gae`) it is k1 = old_logprobs - ref_logprobs over the rollout; with KL in the loss "
            "(`grpo`, `rloo`, `reinforce_pp_baseline`) it is k3 of the training log-probs against the reference during the update. Both estimate KL(policy || reference) without bias; k1 is noisier per token.",
        ]
    return common + [
        "- Training episode return: undiscounted return of the episodes that ended in a rollout (stochastic policy). Eval return: deterministic policy (argmax / mean) "
        "on the run's fixed evaluation start states. Gymnasium has no reference model, so the KL panel shows `approx_kl` between the policy before and after each update.",
    ]


# ---------------------------------------------------------------------------------- the runs
def _machine() -> str:
    import importlib.metadata as md

    try:
        torch_v = md.version("torch")
    except md.PackageNotFoundError:
        torch_v = "?"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch_v}"


def _run_overrides(mode: str, target: str, estimator: str, seed: int, steps: Optional[int], run_dir: Path, overrides: list[str], presets: bool) -> list[str]:
    if mode == "lm":
        base = {**LM_DEFAULTS, "task": target, "estimator": estimator, "seed": seed, "output_dir": str(run_dir)}
        if steps is not None:
            base["total_steps"] = steps
    else:
        base = {**GYM_DEFAULTS, **(GYM_PRESETS.get((target, estimator), {}) if presets else {}), "env_id": target, "estimator": estimator, "seed": seed, "run_dir": str(run_dir)}
        if steps is not None:
            base["total_env_steps"] = steps
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in base.items()] + list(overrides)


def _pinned(cfg) -> list[str]:
    """Every field of ``cfg`` as ``key=value`` (lists and mappings as JSON). Empty mappings are
    left out: ``Config`` does not turn the string ``{}`` back into a dict for a field typed
    plain ``dict`` (GymConfig.env_kwargs), and an empty mapping is every such field's default."""
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) or v is None else v}" for k, v in cfg.to_dict().items() if v != {}]


def _build_config(mode: str, overrides: list[str]):
    if mode == "lm":
        from .lm.cli import build_config

        return build_config(None, overrides)
    from .gym.config import GymConfig

    return GymConfig.load(None, overrides)


def _resolved_summary(mode: str, cfg) -> str:
    if mode == "lm":
        from .core import get_estimator

        spec = get_estimator(cfg.estimator)
        return (f"KL in `{cfg.resolved_kl_placement}` ({cfg.resolved_kl_estimator}, beta {cfg.kl_coef}), loss `{cfg.resolved_loss_agg}`, gamma {cfg.gamma}, "
                f"{'critic (lr ' + str(cfg.critic_lr) + ', lam ' + str(cfg.lam) + ')' if spec.needs_critic else 'no critic'}, "
                f"{cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples, lr {cfg.lr}, {cfg.sft_steps} warm-start steps")
    crit = "critic" if cfg.estimator == "gae" else "no critic"
    return (f"{crit}, gamma {cfg.gamma}" + (f", lam {cfg.lam}" if cfg.estimator == "gae" else "") +
            f", {cfg.num_envs} envs x {cfg.steps_per_env} steps, {cfg.epochs} epochs, mini-batch {cfg.mini_batch_size}, lr {cfg.lr} ({cfg.lr_schedule}), "
            f"entropy_coef {cfg.entropy_coef}, normalize_reward {cfg.normalize_reward}, normalize_obs {cfg.normalize_obs}")


def _run_name(estimator: str, seed: int) -> str:
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


def load_runs(out: Path, spec: dict) -> tuple[list[RunData], list[dict]]:
    """The finished runs of ``spec`` under ``out/runs`` (order: estimators, then seeds) and the failed ones."""
    from .run import read_metrics

    runs, failed = [], []
    for est in spec["estimators"]:
        for seed in spec["seeds"]:
            d = out / "runs" / _run_name(est, seed)
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
            name = _run_name(est, seed)
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
                proc = subprocess.run([sys.executable, "-m", "reinforcepp.compare", str(child_spec)], stdout=logf, stderr=subprocess.STDOUT, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0 or not res_path.exists():
                tail = (out / "logs" / f"{name}.log").read_text().strip().splitlines()[-1:] or ["?"]
                res = {"status": "failed", "overrides": overrides, "error": f"exit code {proc.returncode}: {tail[0][:300]}", "wall_s": wall}
                log(f"[{done}/{total}] {name}: FAILED ({res['error']}); log: {out / 'logs' / (name + '.log')}")
            else:
                res = json.loads(res_path.read_text())
                res["wall_s"] = wall
                log(f"[{done}/{total}] {name}: {wall:.0f} s, peak RSS {res['peak_rss_mb']:.0f} MB")
            res_path.write_text(json.dumps(res, indent=1))


def _child(spec_path: str) -> int:
    """Child process: train one run, then write its timings and its own memory numbers."""
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    mode, overrides = spec["mode"], spec["overrides"]
    trainer_cls: Any
    if mode == "lm":
        from .lm.trainer import Trainer as trainer_cls
    else:
        from .gym.trainer import GymTrainer as trainer_cls
    base_rss = _proc_status_mb("VmRSS")
    t_import = time.perf_counter()
    cfg = _build_config(mode, overrides)
    trainer = trainer_cls(cfg)
    t_setup = time.perf_counter()
    reset = _reset_peak_rss()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    try:
        trainer.train()
    finally:
        if mode == "gym":
            trainer.close()
    t_train = time.perf_counter()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    peak_mb = peak_kb / 2**20 if sys.platform == "darwin" else peak_kb / 1024
    result = {"status": "ok", "overrides": overrides, "import_s": t_import - t_start, "setup_s": t_setup - t_import,
              "train_s": t_train - t_setup, "base_rss_mb": base_rss, "peak_rss_mb": peak_mb,
              "train_peak_rss_mb": _proc_status_mb("VmHWM") if reset else math.nan, "state_mb": _state_mb(trainer),
              "load_start": load_start, "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan}
    Path(spec["result"]).write_text(json.dumps(result, indent=1))
    return 0


def _state_mb(trainer: Any) -> float:
    """Bytes (in MB) of every distinct tensor the trainer keeps between steps: the parameters
    and buffers of the policy, reference and critic, their gradients and the optimizers' state.
    Exact, and what grows with the model size (unlike the runtime's own few hundred MB)."""
    import torch

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            seen.setdefault(t.data_ptr(), t.numel() * t.element_size())

    for name in ("policy", "ref_model", "critic"):
        module = getattr(trainer, name, None)
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                add(p)
                add(p.grad)
            for b in module.buffers():
                add(b)
    for name in ("optimizer", "critic_optimizer"):
        opt = getattr(trainer, name, None)
        for state in getattr(opt, "state", {}).values():
            for v in state.values():
                add(v)
    return sum(seen.values()) / 2**20


def _proc_status_mb(field_name: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident high-water mark) from /proc, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: ``5`` > /proc/self/clear_refs),
    so that ``VmHWM`` afterwards is the peak of the training loop alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reinforcepp compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--task", default=None, help="built-in language-model task (reverse, sort, add); the tiny-model preset")
    g.add_argument("--env", default=None, help="Gymnasium environment id")
    g.add_argument("--report-only", default=None, metavar="OUT", help="rebuild OUT's report from its finished runs; trains nothing")
    p.add_argument("--estimators", default="reinforce_pp,gae", help="comma-separated estimator names")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    p.add_argument("--steps", type=int, default=None, help="RL steps (LM: total_steps) or environment steps (gym: total_env_steps); default: the config's")
    p.add_argument("--out", default=None, help="output directory: runs/, logs/, compare.json (default runs/compare-<task or env>)")
    p.add_argument("--report-dir", default=None, help="where report.md and compare.png go (default: OUT)")
    p.add_argument("--no-presets", action="store_true", help="Gymnasium: do not apply the tuned per-(env, estimator) settings of docs/gym.md")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from .config import ConfigError

    if args.report_only:
        out = Path(args.report_only)
        if not (out / SPEC_FILE).exists():
            print(f"reinforcepp compare: {out / SPEC_FILE} does not exist: is {out} the --out of a comparison?", file=sys.stderr)
            return 2
        spec = json.loads((out / SPEC_FILE).read_text())
        runs, failed = load_runs(out, spec)
        print(build_report(spec, runs, failed, Path(args.report_dir or spec.get("report_dir") or out)))
        return 0
    if not args.task and not args.env:
        print("reinforcepp compare: give --task (language model) or --env (Gymnasium), or --report-only OUT", file=sys.stderr)
        return 2
    mode, target = ("lm", args.task) if args.task else ("gym", args.env)
    estimators = [e for e in args.estimators.split(",") if e]
    if len(set(estimators)) != len(estimators) or not estimators:
        print(f"reinforcepp compare: --estimators must name distinct estimators, got {args.estimators!r}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("reinforcepp compare: --seeds must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/compare-{target}")
    report_dir = Path(args.report_dir) if args.report_dir else out
    seeds = list(range(args.seeds))
    run_overrides, resolved = {}, {}
    try:
        for est in estimators:
            for seed in seeds:
                name, extra = parse_variant(est)
                ov = _run_overrides(mode, target, name, seed, args.steps, out / "runs" / _run_name(est, seed), list(args.overrides) + extra, not args.no_presets)
                cfg = _build_config(mode, ov)  # validate every run before the first one starts
                # pin the whole resolved config: an edit of a preset while the comparison runs
                # (they take an hour) must not change the later runs
                run_overrides[_run_name(est, seed)] = _pinned(cfg)
            resolved[est] = _resolved_summary(mode, cfg)
    except (ConfigError, ValueError) as e:
        print(f"reinforcepp compare: {e}", file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else (cfg.total_steps if mode == "lm" else cfg.total_env_steps)
    spec = {
        "mode": mode, "target": target, "estimators": estimators, "seeds": seeds, "steps_label": f"{steps:,}",
        "overrides": list(args.overrides), "compare_defaults": LM_DEFAULTS if mode == "lm" else GYM_DEFAULTS,
        "presets": (not args.no_presets) if mode == "gym" else None, "command": "reinforcepp compare " + shlex.join(argv),
        "machine": _machine(), "started": time.strftime("%Y-%m-%d %H:%M"), "out": str(out), "report_dir": str(report_dir),
        "resolved": resolved, "run_overrides": run_overrides,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    run_compare(spec, out, log=lambda s: print(s, file=sys.stderr, flush=True))
    runs, failed = load_runs(out, spec)
    path = build_report(spec, runs, failed, report_dir)
    print(path)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
