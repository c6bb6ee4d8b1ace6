"""The core imports with torch only: no transformers, datasets, gymnasium or vllm, and it does
not initialise torch.distributed (STYLE.md, "A pure core")."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import reinforcepp.core
import torch.distributed as dist
heavy = sorted(m for m in ("transformers", "datasets", "gymnasium", "vllm") if m in sys.modules)
assert not heavy, f"reinforcepp.core imported {heavy}"
assert not (dist.is_available() and dist.is_initialized()), "torch.distributed was initialised"
print("ok")
"""


def test_core_imports_without_heavy_dependencies():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

