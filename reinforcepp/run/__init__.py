"""What every run writes, whatever it trains: the run directory (resolved config,
``metrics.jsonl``, TensorBoard events, optional W&B, PNG plots), atomic checkpoints and the
progress bar. Shared by the language-model and the Gymnasium trainers."""

from .checkpoint import CheckpointManager, atomic_directory
from .guard import DivergenceGuard, NonFiniteGuard
from .logger import RunLogger, read_metrics
from .plots import plot_run
from .progress import Progress

__all__ = ["CheckpointManager", "DivergenceGuard", "NonFiniteGuard", "atomic_directory", "RunLogger", "read_metrics",
           "plot_run", "Progress"]
