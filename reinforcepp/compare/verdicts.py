"""The paper's claims that ``reinforcepp compare`` tests, and the rules that give their verdicts.

:data:`RULES` states each rule in words (the report prints them); :func:`verdict_ratio`,
:func:`verdict_interval` and :func:`verdict_spread` apply them to numbers; :func:`claims` turns the
per-estimator summaries of :mod:`.stats` into one :class:`Claim` per claim, with its evidence.
A verdict is HOLDS, DOES NOT HOLD, INCONCLUSIVE or NOT TESTED (an estimator it needs is missing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .stats import EstimatorSummary, format_mean_std, paired_ratios, ratio

RULES = {
    "ratio": "ratio of means r = REINFORCE++ / PPO (gae), and the paired ratios of each seed (the two runs of a seed "
             "ran one after the other, under the same machine load): HOLDS if r <= 0.95 and every paired ratio < 1, "
             "DOES NOT HOLD if r >= 1.05 and every paired ratio > 1, INCONCLUSIVE otherwise (timings and RSS on a "
             "shared machine move by several percent from run to run); a time is INCONCLUSIVE whatever r is when "
             "the 1-min load average of a run of either side exceeded the machine's core count (it then measures "
             "the other jobs as much as the trainer)",
    "interval": "mean +- std over seeds of each estimator: HOLDS if REINFORCE++'s whole interval lies below GRPO's, "
                "DOES NOT HOLD if it lies above, INCONCLUSIVE if the intervals overlap or a side has fewer than "
                "2 seeds",
    "spread": "s = std over seeds of the final held-out accuracy: HOLDS if s(REINFORCE++) <= 0.8 s(GRPO), "
              "DOES NOT HOLD if s(REINFORCE++) >= 1.25 s(GRPO), INCONCLUSIVE in between, when both are 0, "
              "or with fewer than 2 seeds",
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


# (stat key, statement, what is measured (unit), format): the claims that compare reinforce_pp with gae
_COST_CLAIMS = (
    ("train_s", "REINFORCE++ trains in less time than PPO with a critic (no critic forward/backward)",
     "training-loop time (s)", ".1f"),
    ("train_peak_rss_mb", "REINFORCE++ needs less memory than PPO with a critic, as measured",
     "peak RSS of the training loop (MB)", ".0f"),
    ("state_mb", "REINFORCE++ keeps less model state than PPO with a critic (no critic weights, gradients, "
     "optimizer state)", "models + grads + optimizer state (MB)", ".2f"),
)


def claims(summaries: dict[str, EstimatorSummary], mode: str, cores: int | None = None) -> list[Claim]:
    """The paper's claims that this comparison can test, each with a verdict by :data:`RULES`;
    ``cores``: the machine's CPU cores (the time claim is INCONCLUSIVE when a run's load exceeded it)."""
    out: list[Claim] = []
    rpp, gae, grpo = (summaries.get(n) for n in ("reinforce_pp", "gae", "grpo"))
    pm = format_mean_std

    def missing(*names: str) -> str:
        return "NOT TESTED: " + ", ".join(n for n in names if n not in summaries) + " not in this comparison"

    for key, statement, what, fmt in _COST_CLAIMS:
        if rpp is None or gae is None:
            out.append(Claim(what, statement, RULES["ratio"], missing("reinforce_pp", "gae"), ""))
            continue
        r = ratio(summaries, key)
        paired = paired_ratios(summaries, key)
        extra = ""
        if key == "train_peak_rss_mb":
            extra = (f"; whole-run peak RSS ratio {ratio(summaries, 'peak_rss_mb'):.3f}, both on top of "
                     f"~{rpp.mean_std('base_rss_mb')[0]:.0f} MB that the imports alone take")
        elif key == "train_s":
            extra = (f"; median step-time ratio {ratio(summaries, 'step_s'):.3f}, "
                     f"whole-run wall-time ratio {ratio(summaries, 'wall_s'):.3f}")
        verdict = verdict_ratio(r, paired)
        load = max((x for x in rpp.per_seed.get("load", []) + gae.per_seed.get("load", []) if math.isfinite(x)),
                   default=math.nan)
        if key == "train_s" and cores and load > cores:
            verdict = "INCONCLUSIVE"
            extra += f"; the machine was loaded (1-min load average up to {load:.1f} on {cores} cores)"
        out.append(Claim(what.split(" (")[0], statement, RULES["ratio"], verdict,
                         f"{what}: REINFORCE++ {pm(rpp.mean_std(key), fmt)}, gae {pm(gae.mean_std(key), fmt)}, "
                         f"ratio {r:.3f} (per seed: {', '.join(f'{p:.3f}' for p in paired)}){extra}"))
    if mode != "lm":
        out.append(Claim("stability vs GRPO", "REINFORCE++ is more stable than GRPO", "",
                         "NOT TESTED: GRPO needs several samples of one prompt; a Gymnasium reset draws a new start "
                         "state", ""))
        return out
    challengers = [n for n in ("reinforce_pp", "reinforce_pp_baseline") if n in summaries]
    if grpo is None or not challengers:
        for name in ("KL growth", "seed spread", "train vs held-out gap", "held-out accuracy"):
            out.append(Claim(name, f"REINFORCE++ beats GRPO on {name}", "", missing("reinforce_pp", "grpo"), ""))
        return out
    for name in challengers:
        out += _stability_claims(summaries[name], grpo, "" if name == "reinforce_pp" else f" ({name})")
    return out


def _stability_claims(rpp: EstimatorSummary, grpo: EstimatorSummary, suffix: str) -> list[Claim]:
    """The paper's claims against GRPO, for ``rpp`` (REINFORCE++ or REINFORCE++-baseline)."""
    pm = format_mean_std
    who = "REINFORCE++" + ("-baseline" if suffix else "")
    out: list[Claim] = []
    a, b = rpp.mean_std("kl_growth"), grpo.mean_std("kl_growth")
    out.append(Claim("KL growth" + suffix, f"{who}'s KL to the reference grows less than GRPO's", RULES["interval"],
                     verdict_interval(a, b),
                     f"KL growth per token (end - start): {who} {pm(a, '+.4f')}, GRPO {pm(b, '+.4f')}; "
                     f"KL at the end {pm(rpp.mean_std('kl_end'), '.4f')} vs {pm(grpo.mean_std('kl_end'), '.4f')}"))
    sa, sb = rpp.mean_std("acc_final")[1], grpo.mean_std("acc_final")[1]
    out.append(Claim("seed spread" + suffix, f"{who}'s results vary less across seeds than GRPO's", RULES["spread"],
                     verdict_spread(sa, sb),
                     f"std over {len(rpp.seeds)} / {len(grpo.seeds)} seeds of the final held-out accuracy: "
                     f"{who} {sa:.3f}, GRPO {sb:.3f} "
                     f"(means {rpp.mean_std('acc_final')[0]:.3f} vs {grpo.mean_std('acc_final')[0]:.3f})"))
    a, b = rpp.mean_std("gap"), grpo.mean_std("gap")
    out.append(Claim("train vs held-out gap" + suffix,
                     f"{who} overfits the training prompts less than GRPO (smaller train - held-out reward gap)",
                     RULES["interval"], verdict_interval(a, b),
                     f"train reward (end) - held-out sampled reward (final): {who} {pm(a, '+.3f')}, "
                     f"GRPO {pm(b, '+.3f')}"))
    (ma, sa2), (mb, sb2) = rpp.mean_std("acc_final"), grpo.mean_std("acc_final")
    out.append(Claim("held-out accuracy" + suffix, f"{who} generalises better than GRPO (higher final held-out "
                     "accuracy)", RULES["interval"] + " (here higher is better: the intervals of the negated "
                     "accuracies)", verdict_interval((-ma, sa2), (-mb, sb2)),
                     f"final held-out accuracy (greedy): {who} {pm((ma, sa2), '.3f')}, GRPO {pm((mb, sb2), '.3f')}"))
    return out
