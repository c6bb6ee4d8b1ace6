"""Atomic checkpoints: write into a temporary directory beside the target, then rename.

A crash while writing leaves the previous checkpoints untouched (the half-written temporary
directory is ignored and removed on the next save). ``keep_last`` bounds disk use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

STEP_PREFIX = "step_"


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on normal exit it replaces ``target`` atomically
    (``os.replace`` of a directory on the same filesystem); on an exception it is deleted and
    ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        with open(tmp / "COMPLETE", "w") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class CheckpointManager:
    """Checkpoints under ``RUN_DIR/checkpoints/step_000123``; only complete ones count."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        return self.root / f"{STEP_PREFIX}{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.exists():
            return []
        found = [p for p in self.root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "COMPLETE").exists()]
        return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

    @contextlib.contextmanager
    def save(self, step: int) -> Iterator[Path]:
        """``with manager.save(step) as d: write files into d`` -- atomic, then prune."""
        for stale in self.root.glob(".tmp-*") if self.root.exists() else []:
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_directory(self.path(step)) as d:
            yield d
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
