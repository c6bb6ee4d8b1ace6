"""Metrics to ``metrics.jsonl``, TensorBoard and (optionally) Weights & Biases."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of ``RUN_DIR/metrics.jsonl``, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError("wandb_project is set but wandb is not installed: pip install 'reinforcepp[wandb]'") from None
            self._wandb = wandb.init(project=wandb_project, name=wandb_run_name, dir=str(self.run_dir), config=dict(config or {}))

    def truncate(self, last_step: int) -> None:
        """Drop rows after ``last_step`` (used on resume, so that history matches the weights)."""
        if self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
            self.path.write_text("".join(r + "\n" for r in rows))

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        row: dict[str, Any] = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            row[k] = float(v) if hasattr(v, "item") or isinstance(v, (int, float)) else v
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, float) and k not in ("time",) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(_tag(k, kind), v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({_tag(k, kind): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _tag(key: str, kind: str) -> str:
    """TensorBoard / W&B tag: ``eval/accuracy`` stays ``eval/accuracy`` (never
    ``eval/eval/accuracy``); a key of another kind without its prefix gets it."""
    return key if kind == "train" or key.startswith(f"{kind}/") else f"{kind}/{key}"
