"""PNG plots of a run's curves, from its ``metrics.jsonl``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from .logger import read_metrics

DEFAULT_KEYS = (
    "reward/mean",
    "eval/accuracy",
    "eval/return_mean",
    "kl/mean_token",
    "loss/policy",
    "entropy",
    "response/length_mean",
    "clip/frac_low",
    "clip/frac_high",
    "approx_kl",
    "grad_norm",
    "episode/return_mean",
    "env/tool_call_rate",
    "eval/tool_call_rate",
    "env/turns",
)


def plot_run(run_dir: str | Path, keys: Optional[Sequence[str]] = None, out: Optional[str | Path] = None) -> Path:
    """Plot each metric in ``keys`` (default: the standard ones present in the run) against
    the step, one panel each, train and eval rows separately. Returns the PNG path
    (``RUN_DIR/plots.png`` by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    present = {k for r in rows for k in r}
    keys = [k for k in (keys or DEFAULT_KEYS) if k in present]
    if not keys:
        keys = sorted(k for k in present if k not in ("step", "kind", "time") and any(isinstance(r.get(k), float) for r in rows))[:12]
    cols = min(3, max(1, len(keys)))
    nrows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for kind, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[key]) for r in rows if r.get("kind", "train") == kind and isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, markersize=3, label=kind)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(Path(run_dir).name, fontsize=10)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "plots.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
