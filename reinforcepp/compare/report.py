"""``report.md``: the Markdown report of ``reinforcepp compare``.

:func:`build_report` writes ``report.md`` and (through :func:`.plots.plot_compare`) ``compare.png``
from the comparison's specification (``compare.json``) and its finished runs: how it was made,
each estimator's resolved settings, the tables of :mod:`.stats`, the ratios REINFORCE++ / PPO,
the claims of :mod:`.verdicts` with their rules, how every number is made, and one row per seed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from .plots import plot_compare
from .stats import RATIO_KEYS, TABLE_COST, TABLE_LEARNING, RunData, format_mean_std, ratio, stats_for, summarize
from .verdicts import RULES, claims


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
    defaults = " ".join(f"{k}={v}" for k, v in spec["compare_defaults"].items())
    presets = "applied where one exists" if spec.get("presets") else "off (--no-presets)"
    L += [f"- estimators: {', '.join(spec['estimators'])}; seeds: {', '.join(map(str, spec['seeds']))}; "
          f"{spec.get('steps_label', '')} {unit}".rstrip(),
          f"- overrides given to every run: `{' '.join(spec['overrides']) or '(none)'}`; "
          f"compare's own defaults: `{defaults}`",
          *([f"- Gymnasium presets (tuned settings of docs/gym.md, `GYM_PRESETS`): {presets}"]
            if mode == "gym" else []),
          f"- machine: {spec['machine']}; runs one at a time, each in its own process, seeds in the outer loop",
          f"- started {spec['started']}, {len(runs)} runs finished, {len(failed)} failed", ""]
    L += ["Each estimator keeps its own defaults:", "", "| estimator | settings that differ between estimators |",
          "|---|---|"]
    for est in spec["estimators"]:
        L.append(f"| `{est}` | {spec['resolved'].get(est, '')} |")
    L.append("")
    if failed:
        L += ["**Failed runs** (not in the numbers below):", ""]
        L += [f"- `{f['estimator']}` seed {f['seed']}: {f.get('error', '?')}" for f in failed] + [""]
    if png is not None:
        L += [f"![curves]({png.name})", ""]
    L += ["## Results (mean ± sample std over seeds)", ""]
    for name, keys in (("Learning and stability", TABLE_LEARNING[mode]), ("Cost", TABLE_COST)):
        L += [f"### {name}", "", "| estimator | seeds | " + " | ".join(stat_by_key[k].label for k in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
        for est, s in summaries.items():
            cells = " | ".join(format_mean_std(s.mean_std(k), stat_by_key[k].fmt) for k in keys)
            L.append(f"| `{est}` | {len(s.seeds)} | " + cells + " |")
        L.append("")
    if mode == "lm" and summaries:
        spreads = ", ".join(f"`{e}` {_fmt(s.mean_std('acc_final')[1], '.3f')}" for e, s in summaries.items())
        L += ["Seed spread (std of the final held-out accuracy over seeds): " + spreads, ""]
    if "reinforce_pp" in summaries and "gae" in summaries:
        L += ["### Ratios REINFORCE++ / PPO with a critic (`reinforce_pp` / `gae`, ratio of means)", "",
              "| " + " | ".join(stat_by_key[k].label for k in RATIO_KEYS) + " |", "|" + "---|" * len(RATIO_KEYS)]
        L += ["| " + " | ".join(_fmt(ratio(summaries, k), ".3f") for k in RATIO_KEYS) + " |", ""]
    L += ["## Claims of the paper, tested at this small scale", ""]
    for c in claims(summaries, mode, _cores(spec)):
        L.append(f"- **{c.name}: {c.verdict}.** {c.statement}." + (f" {c.evidence}." if c.evidence else ""))
    if mode != "lm":
        model = "small MLP policies"
    elif any(o.startswith("model=") for o in spec["overrides"]):
        model = "the given model"
    else:
        model = "the tiny built-in model"
    L += ["", f"Scale: {len(spec['seeds'])} seeds of {spec.get('steps_label', '?')} {unit} on a CPU, with "
          + model + ". The paper's claims are about large models on GPUs; "
          "a verdict here says whether the effect shows at this scale, not whether it holds at the paper's."]
    L += ["", "Rules (applied mechanically to the numbers above):", ""] + [f"- {k}: {v}." for k, v in RULES.items()]
    L += [""]
    L += ["## How the numbers are made", ""]
    L += _definitions(mode) + [""]
    per_seed_keys = TABLE_LEARNING[mode] + ["wall_s", "peak_rss_mb"]
    L += ["## Per seed", "", "| estimator | seed | " + " | ".join(stat_by_key[k].label for k in per_seed_keys) + " |",
          "|---|---|" + "---|" * len(per_seed_keys)]
    for est, s in summaries.items():
        for i, seed in enumerate(s.seeds):
            L.append(f"| `{est}` | {seed} | "
                     + " | ".join(_fmt(s.per_seed[k][i], stat_by_key[k].fmt) for k in per_seed_keys) + " |")
    L += ["", f"Run directories: `{spec['out']}/runs/<estimator>_s<seed>/` (not committed). Rebuild this report with "
          f"`reinforcepp compare --report-only {spec['out']}`.", ""]
    path = report_dir / "report.md"
    path.write_text("\n".join(L))
    return path


def _definitions(mode: str) -> list[str]:
    common = [
        "- Curves: at each step, the mean and sample std (divisor n - 1) over the seeds that logged the metric at that "
        "step.",
        "- \"end\" of a training metric: the mean of its last 10 % of logged training rows (at least one); \"start\": "
        "its first 10 %. \"final\" of an evaluation metric: the last evaluation (at the end of training).",
        "- Time: wall time of the run's process as seen by the parent (imports, model set-up, warm start, training, "
        "evaluations, checkpoint); training loop = the trainer's `train()` call alone; median step time = median over "
        "training rows of the summed phase times (the median drops the steps that also ran an evaluation).",
        "- Memory: each run's own peak resident set size, whole run (`getrusage(RUSAGE_SELF).ru_maxrss` in the child "
        "process) and training loop alone (`VmHWM` after resetting it through `/proc/self/clear_refs` when `train()` "
        "starts: set-up transients excluded, every model resident), its RSS right after the imports, and the exact "
        "bytes of the tensors the trainer keeps (parameters and buffers of policy, reference and critic, gradients, "
        "optimizer state), the part that grows with the model.",
        "- Ratios are ratios of the means over seeds.",
    ]
    if mode == "lm":
        return common + [
            "- Train reward: mean scalar reward of the rollout's sampled responses (training prompts, the training "
            "temperature). Held-out accuracy: greedy responses on held-out prompts that earn the full reward. Held-out "
            "reward (sampled): mean reward of `eval_samples` samples per held-out prompt at `eval_temperature` (1.0, "
            "the training temperature), so train - held-out compares like with like: a positive gap means the policy "
            "does better on prompts it trained on.",
            "- KL per token: `kl/mean_token`. With KL in the reward (`reinforce_pp`, `gae`) it is k1 = old_logprobs - "
            "ref_logprobs over the rollout; with KL in the loss (`grpo`, `rloo`, `reinforce_pp_baseline`) it is k3 of "
            "the training log-probs against the reference during the update. Both estimate KL(policy || reference) "
            "without bias; k1 is noisier per token.",
        ]
    return common + [
        "- Training episode return: undiscounted return of the episodes that ended in a rollout (stochastic policy). "
        "Eval return: deterministic policy (argmax / mean) on the run's fixed evaluation start states. Gymnasium has "
        "no reference model, so the KL panel shows `approx_kl` between the policy before and after each update.",
    ]


def _cores(spec: dict) -> int | None:
    """The CPU cores of the machine the comparison ran on (from its description in the spec)."""
    m = re.search(r"(\d+) CPU cores", spec.get("machine", ""))
    return int(m.group(1)) if m else None
