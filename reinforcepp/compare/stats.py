"""Curve statistics and per-run summaries of ``reinforcepp compare``.

Curves: :func:`mean_std` (sample std), :func:`series`, :func:`window` (the "end" / "start" of a
training metric) and :func:`aggregate_curves` (mean and std over seeds at each step). Summaries:
one :class:`Stat` per number of the report's tables (:data:`LM_STATS`, :data:`GYM_STATS`), the
runs as :class:`RunData`, their values per estimator and seed as :class:`EstimatorSummary`
(:func:`summarize`), and the ratios of means that the report and the claims quote (:func:`ratio`,
:func:`paired_ratios`). Pure Python over the rows of ``metrics.jsonl``: no I/O, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence


# ------------------------------------------------------------------------------ statistics
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


def format_mean_std(ms: tuple[float, float], fmt: str) -> str:
    """``"m ± s"`` in the format ``fmt`` (the std without its sign), ``"m"`` when the std is not
    finite (one seed), ``"n/a"`` when the mean is not."""
    m, s = ms
    if not math.isfinite(m):
        return "n/a"
    return f"{m:{fmt}} ± {s:{fmt.lstrip('+')}}" if math.isfinite(s) else f"{m:{fmt}}"


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


def aggregate_curves(
    per_seed: Sequence[Sequence[dict]], key: str, kind: str = "train"
) -> tuple[list[float], list[float], list[float], list[int]]:
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
    totals = [sum(r.get(f"time/{p}", 0.0) for p in phases) for r in rows
              if r.get("kind", "train") == "train" and any(f"time/{p}" in r for p in phases)]
    return _median(totals)


# ----------------------------------------------------------------------- per-run summaries
@dataclass(frozen=True)
class Stat:
    """One number per run, aggregated over seeds in the report's tables."""

    key: str
    label: str
    fmt: str
    fn: Callable[[Sequence[dict], dict], float]
    """``fn(metrics_rows, run_result) -> value``"""


def _heldout_reward_lm(rows: Sequence[dict]) -> float:
    """The final sampled held-out reward, else the final (greedy) held-out reward."""
    held = _last(rows, "eval/sampled_reward_mean", "eval")
    return held if math.isfinite(held) else _last(rows, "eval/reward_mean", "eval")


def _gap_lm(rows, _res):
    return _train_window(rows, "reward/mean") - _heldout_reward_lm(rows)


def _result(key: str) -> Callable[[Sequence[dict], dict], float]:
    """The number ``key`` of the run's ``compare_run.json`` (nan if absent)."""
    return lambda rows, res: res.get(key, math.nan)


def _cost_stats(step_phases: Sequence[str]) -> list[Stat]:
    return [
        Stat("wall_s", "wall time of the run (s)", ".1f", _result("wall_s")),
        Stat("train_s", "training loop (s)", ".1f", _result("train_s")),
        Stat("step_s", "median step time (s): " + "+".join(step_phases), ".3f",
             lambda rows, res: _median_step_time(rows, step_phases)),
        Stat("peak_rss_mb", "peak RSS, whole run (MB)", ".0f", _result("peak_rss_mb")),
        Stat("train_peak_rss_mb", "peak RSS, training loop (MB)", ".0f", _result("train_peak_rss_mb")),
        Stat("base_rss_mb", "RSS after imports (MB)", ".0f", _result("base_rss_mb")),
        Stat("state_mb", "models + grads + optimizer state (MB)", ".2f", _result("state_mb")),
        Stat("load", "machine load (1-min load average, mean of start and end)", ".1f",
             lambda rows, res: 0.5 * (res.get("load_start", math.nan) + res.get("load_end", math.nan))),
    ]


LM_STATS: list[Stat] = [
    Stat("acc_final", "held-out accuracy, final (greedy)", ".3f",
         lambda rows, res: _last(rows, "eval/accuracy", "eval")),
    Stat("acc_start", "held-out accuracy, first eval", ".3f", lambda rows, res: _first(rows, "eval/accuracy", "eval")),
    Stat("reward_end", "train reward, end", ".3f", lambda rows, res: _train_window(rows, "reward/mean")),
    Stat("heldout_reward", "held-out reward, final (sampled)", ".3f", lambda rows, res: _heldout_reward_lm(rows)),
    Stat("gap", "train - held-out reward gap", "+.3f", _gap_lm),
    Stat("uniform_groups", "groups with equal rewards (mean over steps)", ".3f",
         lambda rows, res: window([v for _, v in series(rows, "reward/uniform_groups", "train")], frac=1.0)),
    Stat("group_std", "within-group reward std (mean over steps)", ".3f",
         lambda rows, res: window([v for _, v in series(rows, "reward/group_std_mean", "train")], frac=1.0)),
    Stat("kl_end", "KL per token, end", ".4f", lambda rows, res: _train_window(rows, "kl/mean_token")),
    Stat("kl_growth", "KL growth (end - start)", "+.4f",
         lambda rows, res: _train_window(rows, "kl/mean_token") - _train_window(rows, "kl/mean_token", end=False)),
    Stat("length_end", "response length, end", ".2f", lambda rows, res: _train_window(rows, "response/length_mean")),
    Stat("entropy_end", "entropy, end", ".3f", lambda rows, res: _train_window(rows, "entropy")),
    *_cost_stats(("generate", "score", "forward", "update")),
]

GYM_STATS: list[Stat] = [
    Stat("eval_final", "deterministic eval return, final", ".1f",
         lambda rows, res: _last(rows, "eval/return_mean", "eval")),
    Stat("eval_best", "deterministic eval return, best", ".1f",
         lambda rows, res: max((v for _, v in series(rows, "eval/return_mean", "eval")), default=math.nan)),
    Stat("return_end", "training episode return, end", ".1f",
         lambda rows, res: _train_window(rows, "episode/return_mean")),
    Stat("gap", "training - eval return", "+.1f",
         lambda rows, res: _train_window(rows, "episode/return_mean") - _last(rows, "eval/return_mean", "eval")),
    Stat("approx_kl_end", "approx KL(old, new) per update, end", ".4f",
         lambda rows, res: _train_window(rows, "approx_kl")),
    Stat("length_end", "episode length, end", ".1f", lambda rows, res: _train_window(rows, "episode/length_mean")),
    Stat("entropy_end", "entropy, end", ".3f", lambda rows, res: _train_window(rows, "entropy")),
    *_cost_stats(("rollout", "advantages", "update")),
]

TABLE_LEARNING = {
    "lm": ["acc_final", "acc_start", "reward_end", "heldout_reward", "gap", "uniform_groups", "group_std", "kl_end",
           "kl_growth", "length_end", "entropy_end"],
    "gym": ["eval_final", "eval_best", "return_end", "gap", "approx_kl_end", "length_end", "entropy_end"],
}
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


def paired_ratios(
    summaries: dict[str, EstimatorSummary], key: str, num: str = "reinforce_pp", den: str = "gae"
) -> list[float]:
    """``num / den`` of ``key`` for each seed that both estimators ran, in seed order."""
    if num not in summaries or den not in summaries:
        return []
    a = dict(zip(summaries[num].seeds, summaries[num].per_seed.get(key, [])))
    b = dict(zip(summaries[den].seeds, summaries[den].per_seed.get(key, [])))
    return [a[s] / b[s] if b[s] else math.nan for s in sorted(set(a) & set(b))]
