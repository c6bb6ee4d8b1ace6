"""``compare.png``: the curves of ``reinforcepp compare``, one panel per metric.

:data:`LM_PANELS` and :data:`GYM_PANELS` name the metrics drawn; :func:`plot_compare` draws, per
estimator, the mean over seeds and a band of +- one sample std (:func:`.stats.aggregate_curves`).
matplotlib is imported only when a plot is made.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .stats import RunData, aggregate_curves

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
            ax.plot(steps, means, "-" if kind == "train" else "o-", color=c, lw=1.3, ms=2.5,
                    label=f"{est} (n={len(per_seed)})")
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
