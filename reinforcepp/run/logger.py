"""Metrics to ``metrics.jsonl``, TensorBoard and (optionally) Weights & Biases."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import InputError

LOG_FILES = ("metrics.jsonl", "samples.jsonl")
"""The row files of a run; each row has a ``step``."""


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The JSON rows of a ``.jsonl`` file. A last line cut short (a full disk, a kill while
    writing) is dropped with a warning naming the file; a bad line elsewhere is an error
    naming the file and line."""
    path = Path(path)
    lines = path.read_text().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if all(not rest.strip() for rest in lines[i + 1 :]):
                warnings.warn(f"{path}: dropped a truncated last line ({len(line)} characters)", stacklevel=2)
                break
            raise InputError(f"{path}:{i + 1}: not a JSON row: {line[:60]!r}") from None
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of ``RUN_DIR/metrics.jsonl``, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    return read_rows(path)


class RunLogger:
    """Writes one row per step to ``metrics.jsonl`` (flushed at once, so a killed run keeps
    its history) and the same scalars to TensorBoard; W&B when ``wandb_project`` is given.

    Rows carry ``step`` plus the metrics; a row may also carry a ``kind`` ("train" or "eval").
    On resume, rows with a step beyond the checkpoint are dropped first (:meth:`truncate`).
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: Optional[Mapping[str, Any]] = None,
        *,
        tensorboard: bool = True,
        wandb_project: Optional[str] = None,
        wandb_run_name: Optional[str] = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._tb: Any = None
        self._tensorboard = tensorboard
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError(
                    "wandb_project is set but wandb is not installed: pip install 'reinforcepp[wandb]'"
                ) from None
            self._wandb = wandb.init(project=wandb_project, name=wandb_run_name, dir=str(self.run_dir),
                                     config=dict(config or {}))

    def truncate(self, last_step: int) -> None:
        """On resume from the checkpoint of ``last_step``: drop the rows of metrics.jsonl and
        samples.jsonl logged after it (a crash between the checkpoint and the kill) and the
        TensorBoard events after it (:func:`rewrite_tensorboard`), so that the run's history is
        exactly an uninterrupted run's, in every file. Each file is rewritten atomically."""
        for name in LOG_FILES:
            path = self.run_dir / name
            if path.exists():
                rows = [r for r in read_rows(path) if r["step"] <= last_step]
                tmp = path.with_name(f".{name}.tmp")
                tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))
                os.replace(tmp, path)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        rewrite_tensorboard(self.run_dir / "tensorboard", last_step)

    @property
    def tensorboard(self) -> Any:
        """The TensorBoard writer, opened on first use (a new event file beside the rewritten one)."""
        if self._tb is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        return self._tb

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        row: dict[str, Any] = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            row[k] = float(v) if hasattr(v, "item") or isinstance(v, (int, float)) else v
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, float) and k not in ("time",) and math.isfinite(v)}
        if self._tensorboard:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(_tag(k, kind), v, step)
            self.tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({_tag(k, kind): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


EVENT_FILES = "events.out.tfevents.*"


def rewrite_tensorboard(folder: Path, last_step: int) -> None:
    """Rewrite the TensorBoard event files of ``folder`` as one file holding each event up to
    ``last_step`` once (per tag and step, the first written), in the order written; later
    events, and the purge markers older versions wrote, are dropped. TensorBoard itself hides
    the points a resumed run wrote again (``purge_step``), but the raw files kept them, and other
    readers saw every step two or three times.

    Crash-safe: the new folder is written beside the old one, then swapped in by two renames; a
    kill between them leaves ``tensorboard.old``, which the next call puts back first."""
    old, tmp = folder.with_name(f"{folder.name}.old"), folder.with_name(f".{folder.name}.tmp")
    if old.is_dir():
        if folder.is_dir():
            shutil.rmtree(old)  # the swap had finished
        else:
            os.replace(old, folder)  # killed between the renames: the original comes back
    shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(folder.glob(EVENT_FILES)) if folder.is_dir() else []
    if not files:
        return
    from tensorboard.backend.event_processing.event_file_loader import (  # type: ignore[import-untyped]
        RawEventFileLoader,
    )
    from tensorboard.compat.proto.event_pb2 import Event  # type: ignore[import-untyped]
    from tensorboard.summary.writer.record_writer import RecordWriter  # type: ignore[import-untyped]

    from .state import fsync_tree

    tmp.mkdir()
    for entry in folder.iterdir():  # anything else TensorBoard keeps there (plugin data) as it is
        if not entry.match(EVENT_FILES):
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
    # named to sort before any file a writer opens later (TensorBoard reads files in name order)
    stamp, host = files[0].name.split(".")[3:5]
    seen: set[tuple[str, int]] = set()
    version = False
    with open(tmp / f"events.out.tfevents.{stamp}.{host}.0.0", "wb") as out:
        writer = RecordWriter(out)
        for path in files:
            for record in RawEventFileLoader(str(path)).Load():
                event = Event.FromString(record)
                kind = event.WhichOneof("what")
                if kind == "file_version":
                    if not version:
                        writer.write(record)
                    version = True
                    continue
                if kind == "session_log" or event.step > last_step:
                    continue
                if kind == "summary":
                    keys = {(v.tag, event.step) for v in event.summary.value}
                    if keys <= seen:
                        continue
                    seen |= keys
                writer.write(record)
        writer.flush()
    fsync_tree(tmp)
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old)


def _tag(key: str, kind: str) -> str:
    """TensorBoard / W&B tag: ``eval/accuracy`` stays ``eval/accuracy`` (never
    ``eval/eval/accuracy``); a key of another kind without its prefix gets it."""
    return key if kind == "train" or key.startswith(f"{kind}/") else f"{kind}/{key}"
