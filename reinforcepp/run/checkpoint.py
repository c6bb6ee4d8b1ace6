"""Atomic checkpoints: write into a temporary directory beside the target, then rename.

A crash while writing leaves the previous checkpoints untouched (the half-written temporary
directory is ignored and removed on the next save). Every file and directory is fsynced before
the ``COMPLETE`` marker is written, and ``COMPLETE`` lists each file's size and SHA-256, so a
checkpoint damaged later (a bad disk, a partial copy) is recognised and the previous complete
one is used instead (:meth:`CheckpointManager.latest_intact`). ``keep_last`` bounds disk use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional

from .state import fsync_file, fsync_tree

STEP_PREFIX = "step_"
MARKER = "COMPLETE"


def step_of(checkpoint: str | Path) -> int:
    """The step of a checkpoint directory ``.../step_00000123`` (123)."""
    return int(Path(checkpoint).name[len(STEP_PREFIX):])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(directory: Path) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of every file under ``directory`` but the marker."""
    return {str(p.relative_to(directory)): [p.stat().st_size, _sha256(p)]
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER}


def damage(directory: Path) -> Optional[str]:
    """Why the checkpoint ``directory`` is not intact (a missing, resized or altered file), or
    None. Checkpoints whose marker holds no manifest (older versions) are taken as intact."""
    try:
        listed = json.loads((directory / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    for rel, (size, digest) in (listed or {}).items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} were written"
        if _sha256(path) != digest:
            return f"{rel} differs from what was written (SHA-256)"
    return None


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
        fsync_tree(tmp)
        with open(tmp / MARKER, "w") as f:
            f.write(json.dumps({"files": manifest(tmp)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_file(tmp)
        if target.exists():
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_file(target.parent)
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

    def latest_intact(self) -> Optional[Path]:
        """The newest complete checkpoint whose files are as written; each damaged newer one
        is skipped with a warning naming it and the damage."""
        for path in reversed(self.complete()):
            why = damage(path)
            if why is None:
                return path
            warnings.warn(f"checkpoint {path} is damaged ({why}); falling back to the previous complete one",
                          stacklevel=2)
        return None

    @contextlib.contextmanager
    def save(self, step: int) -> Iterator[Path]:
        """``with manager.save(step) as d: write files into d`` -- atomic, then prune."""
        for stale in self.root.glob(".tmp-*") if self.root.exists() else []:
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_directory(self.path(step)) as d:
            yield d
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
