"""``reinforcepp compare``: the aggregation math on hand-written metrics, the report built from
them, the verdict rules at their boundaries, and one small real comparison end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from reinforcepp import compare as C


# ---------------------------------------------------------------------------------- statistics
def test_mean_std_is_the_sample_std():
    m, s = C.mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3, abs=1e-12)
    # sum of squared deviations: (4/3)^2 + (1/3)^2 + (5/3)^2 = 42/9, divided by n - 1 = 2
    assert s == pytest.approx(math.sqrt(42 / 9 / 2), abs=1e-12)
    assert C.mean_std([3.0])[0] == 3.0 and math.isnan(C.mean_std([3.0])[1])
    assert all(math.isnan(x) for x in C.mean_std([]))
    assert C.mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_window_takes_ten_percent_of_the_rows_at_least_one():
    values = [float(i) for i in range(1, 21)]  # 20 values: windows of 2
    assert C.window(values) == 19.5
    assert C.window(values, end=False) == 1.5
    assert C.window([5.0, 7.0]) == 7.0  # ceil(0.2) = 1
    assert math.isnan(C.window([]))


def test_curves_use_the_seeds_that_logged_each_step():
    seed0 = [{"step": 1, "kind": "train", "x": 1.0}, {"step": 2, "kind": "train", "x": 3.0},
             {"step": 2, "kind": "eval", "x": 100.0}]
    seed1 = [{"step": 1, "kind": "train", "x": 3.0}, {"step": 2, "kind": "train"}]  # no x at step 2
    steps, means, stds, counts = C.aggregate_curves([seed0, seed1], "x")
    assert steps == [1, 2] and counts == [2, 1]
    assert means == [2.0, 3.0]
    assert stds[0] == pytest.approx(math.sqrt(2)) and math.isnan(stds[1])
    assert C.aggregate_curves([seed0, seed1], "x", "eval")[1] == [100.0]


def test_verdict_rules_at_their_boundaries():
    assert C.verdict_ratio(0.95) == "HOLDS" and C.verdict_ratio(0.951) == "INCONCLUSIVE"
    assert C.verdict_ratio(1.05) == "DOES NOT HOLD" and C.verdict_ratio(float("nan")) == "INCONCLUSIVE"
    # a seed whose pair goes the other way makes it inconclusive
    assert C.verdict_ratio(0.8, [0.7, 0.9]) == "HOLDS" and C.verdict_ratio(0.8, [0.7, 1.01]) == "INCONCLUSIVE"
    assert C.verdict_ratio(1.2, [1.1, 1.3]) == "DOES NOT HOLD" and C.verdict_ratio(1.2, [0.99, 1.3]) == "INCONCLUSIVE"
    assert C.verdict_interval((1.0, 0.1), (2.0, 0.1)) == "HOLDS"
    assert C.verdict_interval((1.0, 0.5), (2.0, 0.5)) == "INCONCLUSIVE"  # touching intervals overlap
    assert C.verdict_interval((3.0, 0.1), (2.0, 0.1)) == "DOES NOT HOLD"
    assert C.verdict_interval((1.0, float("nan")), (2.0, 0.1)) == "INCONCLUSIVE"  # one seed
    assert C.verdict_spread(0.08, 0.1) == "HOLDS" and C.verdict_spread(0.125, 0.1) == "DOES NOT HOLD"
    assert C.verdict_spread(0.1, 0.1) == "INCONCLUSIVE" and C.verdict_spread(0.0, 0.0) == "INCONCLUSIVE"


# ------------------------------------------------------------ a report from hand-written runs
# Per (estimator, seed s): train rows at steps 1..10 (so every 10 % window is one row), evals at 0 and 10.
# Each estimator's tuple: reward/mean(step, s), kl(step, s), final accuracy by seed, held-out sampled reward(s),
# then update time, train_s by seed, train peak RSS, state MB.
SYNTH = {
    "reinforce_pp": (lambda t, s: t / 10 + 0.1 * s, lambda t, s: 0.01 * t, (0.5, 0.7), lambda s: 1.0 + 0.1 * s,
                     0.2, (10.0, 12.0), 500.0, 10.0),
    "gae": (lambda t, s: t / 10 + 0.1 * s, lambda t, s: 0.01 * t, (0.6, 0.6), lambda s: 1.0 + 0.1 * s,
            0.4, (20.0, 24.0), 510.0, 20.0),
    "grpo": (lambda t, s: t / 10 + 0.2, lambda t, s: 0.05 * t + 0.01 * s, (0.2, 0.8), lambda s: 0.5,
             0.2, (10.0, 10.0), 500.0, 10.0),
}


def write_synthetic(out: Path) -> dict:
    seeds = [0, 1]
    for est, (reward, kl, acc, held, upd, train_s, rss, state) in SYNTH.items():
        for s in seeds:
            d = out / "runs" / f"{est}_s{s}"
            d.mkdir(parents=True)
            rows = [{"step": 0, "kind": "eval", "eval/accuracy": 0.1, "eval/sampled_reward_mean": 0.3}]
            for t in range(1, 11):
                rows.append({"step": t, "kind": "train", "reward/mean": reward(t, s), "kl/mean_token": kl(t, s),
                             "response/length_mean": 5.0, "entropy": 1.0 - 0.01 * t,
                             "time/generate": 0.1 + (5.0 if t == 5 else 0.0), "time/score": 0.0, "time/forward": 0.1,
                             "time/update": upd})
            rows.append({"step": 10, "kind": "eval", "eval/accuracy": acc[s], "eval/sampled_reward_mean": held(s)})
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            result = {"status": "ok", "wall_s": train_s[s] + 20, "train_s": train_s[s], "peak_rss_mb": rss + 1,
                      "train_peak_rss_mb": rss, "base_rss_mb": 200.0, "state_mb": state}
            (d / C.RESULT_FILE).write_text(json.dumps(result))
    spec = {"mode": "lm", "target": "reverse", "estimators": list(SYNTH), "seeds": seeds, "steps_label": "10",
            "overrides": [], "compare_defaults": {}, "machine": "test", "started": "now", "out": str(out),
            "report_dir": str(out),
            "resolved": {e: "" for e in SYNTH}, "command": "reinforcepp compare --task reverse (synthetic)"}
    (out / C.SPEC_FILE).write_text(json.dumps(spec))
    return spec


def test_summary_numbers_on_hand_written_runs(tmp_path):
    spec = write_synthetic(tmp_path)
    runs, failed = C.load_runs(tmp_path, spec)
    assert not failed and len(runs) == 6
    S = C.summarize(runs, "lm")
    rpp, gae, grpo = S["reinforce_pp"], S["gae"], S["grpo"]
    assert rpp.per_seed["reward_end"] == pytest.approx([1.0, 1.1])
    assert rpp.mean_std("reward_end") == (pytest.approx(1.05), pytest.approx(math.sqrt(0.005)))
    assert rpp.per_seed["kl_growth"] == pytest.approx([0.09, 0.09])  # 0.10 - 0.01
    assert grpo.per_seed["kl_growth"] == pytest.approx([0.45, 0.45])  # 0.50 - 0.05 (+0.01 s cancels)
    assert rpp.mean_std("acc_final") == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    assert rpp.per_seed["gap"] == pytest.approx([0.0, 0.0])
    assert grpo.per_seed["gap"] == pytest.approx([0.7, 0.7])  # 1.2 - 0.5
    # the step with the eval's extra 5 s is dropped by the median: 0.1 + 0 + 0.1 + update
    assert rpp.per_seed["step_s"] == pytest.approx([0.4, 0.4]) and gae.per_seed["step_s"] == pytest.approx([0.6, 0.6])
    assert C.ratio(S, "train_s") == pytest.approx(11 / 22)
    assert C.ratio(S, "step_s") == pytest.approx(0.4 / 0.6)
    assert C.ratio(S, "train_peak_rss_mb") == pytest.approx(500 / 510)
    assert C.ratio(S, "state_mb") == pytest.approx(0.5)
    assert C.paired_ratios(S, "train_s") == pytest.approx([10 / 20, 12 / 24])
    verdicts = {c.name: c.verdict for c in C.claims(S, "lm")}
    assert verdicts == {"training-loop time": "HOLDS", "peak RSS of the training loop": "INCONCLUSIVE",
                        "models + grads + optimizer state": "HOLDS", "KL growth": "HOLDS", "seed spread": "HOLDS",
                        "train vs held-out gap": "HOLDS", "held-out accuracy": "INCONCLUSIVE"}
    # a loaded machine makes the time claim inconclusive, whatever the ratio
    gae.per_seed["load"] = [1.5, 2.5]
    assert {c.name: c.verdict for c in C.claims(S, "lm", cores=2)}["training-loop time"] == "INCONCLUSIVE"
    gae.per_seed["load"] = [1.5, 1.9]
    assert {c.name: c.verdict for c in C.claims(S, "lm", cores=2)}["training-loop time"] == "HOLDS"
    # REINFORCE++-baseline, when the comparison has it, gets the same claims against GRPO, named
    both = {c.name: c.verdict for c in C.claims({**S, "reinforce_pp_baseline": rpp}, "lm")}
    assert both["KL growth (reinforce_pp_baseline)"] == "HOLDS" and both["KL growth"] == "HOLDS"
    # held-out accuracy: higher is better; 0.6 +- 0.141 against 0.9 +- 0.0 lies wholly below
    worse = C.EstimatorSummary("grpo", [0, 1], {**grpo.per_seed, "acc_final": [0.9, 0.9]})
    assert {c.name: c.verdict for c in C.claims({**S, "grpo": worse}, "lm")}["held-out accuracy"] == "DOES NOT HOLD"


def test_report_only_rebuilds_markdown_and_png(tmp_path):
    write_synthetic(tmp_path)
    assert C.main(["--report-only", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    png = tmp_path / "compare.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![curves](compare.png)" in md
    assert "| `reinforce_pp` | 2 | 0.600 ± 0.141 |" in md  # final held-out accuracy
    assert "1.050 ± 0.071" in md and "+0.0900 ± 0.0000" in md and "+0.4500 ± 0.0000" in md
    assert "| 0.738 | 0.500 | 0.667 |" in md  # wall (31 / 42), train loop (11 / 22), step-time ratios
    assert "**KL growth: HOLDS.**" in md and "**peak RSS of the training loop: INCONCLUSIVE.**" in md
    assert "| `grpo` | 1 | 0.800 |" in md  # per-seed table


def test_missing_and_failed_runs_are_reported(tmp_path):
    write_synthetic(tmp_path)
    failed = {"status": "failed", "error": "exit code 1: boom"}
    (tmp_path / "runs" / "grpo_s1" / C.RESULT_FILE).write_text(json.dumps(failed))
    (tmp_path / "runs" / "gae_s0" / C.RESULT_FILE).unlink()
    assert C.main(["--report-only", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "`grpo` seed 1: exit code 1: boom" in md and "`gae` seed 0: no compare_run.json" in md
    assert "**seed spread: INCONCLUSIVE.**" in md  # one grpo seed: no spread


def test_bad_config_is_refused_before_any_run(tmp_path, capsys):
    assert C.main(["--task", "reverse", "--estimators", "reinforce_pp,grpo", "--seeds", "1",
                   "--out", str(tmp_path / "o"), "samples_per_prompt=1", "mini_batch_size=32"]) == 2
    assert "samples_per_prompt >= 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert C.main(["--env", "CartPole-v1", "--estimators", "grpo"]) == 2


# ----------------------------------------------------------------------------- end to end
def test_gym_comparison_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--env", "CartPole-v1", "--estimators", "reinforce_pp,gae", "--seeds", "2", "--steps", "512",
            "--out", str(out), "num_envs=2", "steps_per_env=128", "eval_episodes=1", "epochs=1"]
    assert C.main(argv) == 0
    md = (out / "report.md").read_text()
    assert (out / "compare.png").exists()
    spec = json.loads((out / C.SPEC_FILE).read_text())
    assert spec["command"].startswith("reinforcepp compare --env CartPole-v1")
    for est in ("reinforce_pp", "gae"):
        for s in (0, 1):
            res = json.loads((out / "runs" / f"{est}_s{s}" / C.RESULT_FILE).read_text())
            assert res["status"] == "ok" and res["wall_s"] > res["train_s"] > 0 and res["peak_rss_mb"] > 50
            metrics = (out / "runs" / f"{est}_s{s}" / "metrics.jsonl").read_text()
            rows = [json.loads(line) for line in metrics.splitlines()]
            assert rows[-1]["kind"] == "eval" and rows[-1]["step"] == 512
    runs, failed = C.load_runs(out, spec)
    S = C.summarize(runs, "gym")
    # the critic's weights and Adam state: gae keeps strictly more than reinforce_pp
    assert S["gae"].mean_std("state_mb")[0] > S["reinforce_pp"].mean_std("state_mb")[0] > 0
    assert f"| `reinforce_pp` | 2 | {C._pm(S['reinforce_pp'].mean_std('eval_final'), '.1f')} |" in md
    assert "stability vs GRPO: NOT TESTED" in md
    # the presets of docs/gym.md were applied, the key=value overrides won
    assert "lr 0.001 (linear)" in md and "2 envs x 128 steps" in md
    capsys.readouterr()
    assert C.main(argv) == 0  # the same comparison again resumes: finished runs are kept, not re-run
    err = capsys.readouterr().err
    assert err.count("already done, kept") == 4 and "holds this comparison: resuming it" in err
    # another comparison in the same folder is refused with one line; nothing is touched
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert C.main([*argv, "lr=0.002"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert f"{out} holds another comparison (its settings differ" in err
    assert C.main([*argv[:4], "--seeds", "1", *argv[6:]]) == 2
    assert "(its seeds, settings differ" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


def test_compare_never_takes_over_a_folder_that_holds_something_else(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--env", "CartPole-v1", "--estimators", "reinforce_pp", "--seeds", "1", "--steps", "64", "--out", str(out),
            "num_envs=2", "steps_per_env=32", "eval_episodes=1", "epochs=1"]
    assert C.main(argv) == 2
    assert "holds no readable comparison" in capsys.readouterr().err
    assert C.main([*argv, "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("cmp.old-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine" and (out / "report.md").exists()


def test_estimator_variants_carry_their_own_settings():
    from reinforcepp.compare import parse_variant, run_name as _run_name

    assert parse_variant("grpo[kl_estimator=k3+;kl_placement=loss]") == (
        "grpo", ["kl_estimator=k3+", "kl_placement=loss"]
    )
    assert parse_variant("reinforce_pp") == ("reinforce_pp", [])
    assert _run_name("grpo[kl_estimator=k3+;kl_placement=loss]", 1) == "grpo_kl_estimator=k3+_kl_placement=loss__s1"
    with pytest.raises(ValueError, match="not key=value"):
        parse_variant("grpo[oops]")
