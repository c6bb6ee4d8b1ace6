#!/usr/bin/env bash
# The three commands of README.md, then a comparison of the local and the remote run.
# Usage: bash examples/remote_services/run_all.sh [WORKDIR]   (from the repository root)
set -euo pipefail
work="${1:-runs/remote_services}"
steps="${STEPS:-5}"
rp="${REINFORCEPP:-reinforcepp}"   # e.g. REINFORCEPP="python -m reinforcepp.cli" in a checkout
mkdir -p "$work"
common="total_steps=$steps eval_every=0 progress=false tensorboard=false"

$rp train output_dir="$work/local" $common

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
$rp serve reference --model "$work/local/reference" --port 0 > "$work/reference.url" &
pids+=($!)
$rp serve reward --reward reinforcepp.lm.tasks:char_match --port 0 > "$work/reward.url" &
pids+=($!)
url() { until grep -q " on http" "$1" 2>/dev/null; do sleep 0.5; done; sed -n 's/.* on //p' "$1"; }
ref_url=$(url "$work/reference.url")
reward_url=$(url "$work/reward.url")
echo "reference: $ref_url   reward: $reward_url"

$rp train output_dir="$work/remote" $common ref_model="$ref_url" reward_funcs="$reward_url"

python - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = {n: [json.loads(l) for l in (work / n / "metrics.jsonl").read_text().splitlines()] for n in ("local", "remote")}
rows = {n: [r for r in v if r.get("kind") == "train"] for n, v in rows.items()}
print(f"{'step':>4} {'reward local':>13} {'reward remote':>14} {'kl local':>12} {'kl remote':>12}")
worst = 0.0
for a, b in zip(rows["local"], rows["remote"]):
    worst = max(worst, abs(a["kl/mean_token"] - b["kl/mean_token"]), abs(a["reward/mean"] - b["reward/mean"]))
    print(f"{a['step']:>4} {a['reward/mean']:>13.6f} {b['reward/mean']:>14.6f} {a['kl/mean_token']:>12.3e} {b['kl/mean_token']:>12.3e}")
print(f"largest difference: {worst:.2e}")
PY
