"""PNG plots of a run's curves, from its ``metrics.jsonl``: the panels that answer "did it work?".

The panels are chosen for the run (:func:`choose_panels`): the reward (training, and held out:
greedy and sampled), held-out accuracy, then what tells a healthy run from a broken one (KL to
the reference, entropy, response length); clip fractions and ``approx_kl`` only when the run
clips, i.e. when they are not zero at every step (they are exactly zero on-policy, the
default). Gymnasium runs get the episode return, multi-turn runs the tool-call rate and turns.
Fractions are drawn on [0, 1], a reward that stays in [0, 1] too, and other quantities from 0,
so that a 1% change looks like one. The title names the task (or data), the estimator and the
model, from ``config.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .logger import read_metrics


@dataclass(frozen=True)
class Panel:
    """One plot: ``series`` are ``(metric, label)`` pairs (train rows or eval rows by the metric's
    prefix); ``scale`` is ``fraction`` ([0, 1]), ``reward`` ([0, 1] when the values stay there),
    ``positive`` (from 0) or ``free``; ``only_if_nonzero``: left out when every value is 0."""

    title: str
    series: tuple[tuple[str, str], ...]
    scale: str = "free"
    only_if_nonzero: bool = False


PANELS: tuple[Panel, ...] = (
    Panel("reward", (("reward/mean", "train (sampled)"), ("eval/reward_mean", "held-out, greedy"),
                     ("eval/sampled_reward_mean", "held-out, sampled")), "reward"),
    Panel("held-out accuracy (reward >= 1)", (("eval/accuracy", "greedy"), ("eval/pass@1", "pass@1 (sampled)"),
                                               ("eval/any_correct_of_*", "any_correct_of_n")), "fraction"),
    Panel("episode return", (("episode/return_mean", "train"), ("eval/return_mean", "held-out (deterministic)"))),
    Panel("KL to the reference, per token", (("kl/mean_token", "train"),), "positive"),
    Panel("entropy per token", (("entropy", "train"),), "positive"),
    Panel("response length (tokens)", (("response/length_mean", "mean"),), "positive"),
    Panel("tool calls", (("env/tool_call_rate", "train"), ("eval/tool_call_rate", "held-out, greedy")), "fraction"),
    Panel("turns per episode", (("env/turns", "train"), ("eval/turns", "held-out, greedy")), "positive"),
    Panel("clipped tokens",
          (("clip/frac_low", "ratio below 1 - eps_low"), ("clip/frac_high", "ratio above 1 + eps_high")),
          "fraction", only_if_nonzero=True),
    Panel("approx_kl (update vs sampler)", (("approx_kl", "train"),), "positive", only_if_nonzero=True),
)
"""Every panel a run may get, in order; :func:`choose_panels` keeps those the run has data for."""


def _values(rows: Sequence[dict], key: str) -> list[tuple[int, float]]:
    kind = "eval" if key.startswith("eval/") else "train"
    if key.endswith("*"):  # eval/any_correct_of_* : whatever n the run used
        key = next((k for r in rows for k in r if k.startswith(key[:-1])), key)
    return [(r["step"], float(r[key])) for r in rows
            if r.get("kind", "train") == kind and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def choose_panels(rows: Sequence[dict]) -> list[Panel]:
    """The panels of :data:`PANELS` that ``rows`` (a run's metrics) hold data for; those marked
    ``only_if_nonzero`` only when some value is not 0."""
    chosen = []
    for panel in PANELS:
        points = [p for key, _ in panel.series for p in _values(rows, key)]
        if points and (not panel.only_if_nonzero or any(v != 0 for _, v in points)):
            chosen.append(panel)
    return chosen


def y_range(values: Sequence[float], scale: str) -> tuple[float, float]:
    """The y-axis limits of a panel: [0, 1] for fractions (and rewards that stay there), from 0
    for positive quantities, and in every case a span of at least 10% of the largest magnitude, so
    that noise of 1e-3 does not fill the panel."""
    lo, hi = min(values), max(values)
    if scale == "fraction" or (scale == "reward" and lo >= 0 and hi <= 1):
        return -0.02, 1.02
    if scale == "positive" and lo >= 0:
        return 0.0, max(hi, 1e-12) * 1.05
    span = max(hi - lo, 0.1 * max(abs(lo), abs(hi), 1e-12))
    middle = (lo + hi) / 2
    return middle - 0.55 * span, middle + 0.55 * span


def run_title(run_dir: Path) -> str:
    """``task or data, estimator, model`` from the run's ``config.yaml``, then the folder name."""
    import yaml

    path = run_dir / "config.yaml"
    cfg: dict[str, Any] = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    if "env_id" in cfg:
        what = [str(cfg["env_id"]), str(cfg.get("estimator", ""))]
    else:
        data = cfg.get("task") or (Path(str(cfg["train_data"])).name if cfg.get("train_data") else None)
        model = f"model {cfg['model']}" if cfg.get("model") else "the built-in tiny model"
        what = [f"task {data}" if cfg.get("task") else str(data or ""), str(cfg.get("estimator", "")), model]
    head = ", ".join(w for w in what if w)
    return f"{head}\n{run_dir.name}" if head else run_dir.name


def _smoothed(ys: Sequence[float]) -> tuple[list[float], int]:
    window = max(1, len(ys) // 20)
    if window == 1:
        return list(ys), 1
    out = []
    for i in range(len(ys)):
        part = ys[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out, window


def plot_run(run_dir: str | Path, keys: Optional[Sequence[str]] = None, out: Optional[str | Path] = None) -> Path:
    """Plot the run's panels (:func:`choose_panels`), or one panel per metric in ``keys``, against
    the step. Returns the PNG path (``RUN_DIR/plots.png`` by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if keys:
        panels = [Panel(k, ((k, "eval" if k.startswith("eval/") else "train"),)) for k in keys]
    else:
        panels = choose_panels(rows)
    if not panels:  # a run with none of the usual metrics: its first numeric ones
        present = sorted({k for r in rows for k in r
                          if k not in ("step", "kind", "time") and isinstance(r.get(k), float)})
        panels = [Panel(k, ((k, k),)) for k in present[:12]]
    cols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.0 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        drawn: list[float] = []
        for key, label in panel.series:
            points = _values(rows, key)
            if not points:
                continue
            xs, ys = zip(*points)
            drawn += ys
            if key.startswith("eval/"):
                if key.endswith("*"):
                    label = next((k for r in rows for k in r if k.startswith(key[:-1])), key).split("/", 1)[1]
                ax.plot(xs, ys, "o-", markersize=3, label=label)
            else:
                smooth, window = _smoothed(ys)
                line = ax.plot(xs, smooth, "-", label=label if window == 1 else f"{label}, mean of {window} steps")[0]
                if window > 1:
                    ax.plot(xs, ys, "-", color=line.get_color(), alpha=0.25, linewidth=0.8)
        if drawn:
            ax.set_ylim(*y_range(drawn, panel.scale))
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(run_title(run_dir), fontsize=10)
    fig.tight_layout()
    path = Path(out) if out else run_dir / "plots.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
