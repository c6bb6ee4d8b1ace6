#!/usr/bin/env bash
# Install reinforcepp into the active Python environment.
#   bash install.sh          the package
#   bash install.sh test     the package and the test dependencies
#   bash install.sh bench    the package and the benchmark anchors (TRL, Stable-Baselines3)
#   bash install.sh lora     the package and PEFT (lora_rank > 0)
# torch goes in first, pinned, so nothing can pull a multi-GB CUDA build by accident;
# an existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")"
if python -c "import torch" 2>/dev/null; then
    echo "install.sh: keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
else
    python -m pip install "torch==2.13.0"
fi
extras="${1:-}"
if [ -n "$extras" ]; then
    python -m pip install -e ".[$extras]"
else
    python -m pip install -e .
fi
