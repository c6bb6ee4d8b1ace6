"""The options every run has, whatever it trains: where it writes, how it resumes, what it logs.

Both trainers' configs (:class:`reinforcepp.lm.LMConfig`, :class:`reinforcepp.gym.GymConfig`)
inherit them, so each is defined (and documented, and validated) once. What counts steps
(``save_every``, ``eval_every``) stays with each trainer: a language-model step is one rollout,
a Gymnasium step one environment step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..config import Config, ConfigError, option


@dataclasses.dataclass
class RunOptions(Config):
    output_dir: Optional[str] = option(
        None, "run directory: config.yaml, metrics.jsonl, tensorboard/, samples, plots.png, checkpoints/; "
        "None = runs/<task, data or environment>-<estimator>-<time>")
    resume: bool = option(False, "continue from the latest complete checkpoint in output_dir")
    overwrite: bool = option(
        False, "output_dir holds an old run: move it aside (to OUTPUT_DIR.old-<time>) instead of refusing to start")
    keep_last: int = option(2, "checkpoints kept")
    tensorboard: bool = option(True, "write TensorBoard event files")
    wandb_project: Optional[str] = option(None, "log to this Weights & Biases project as well (needs the wandb extra)")
    progress: bool = option(True, "show a progress bar")
    seed: int = option(0, "seed of data order, sampling, environments and initialisation")
    max_nonfinite_steps: int = option(
        3, "optimizer steps with a non-finite loss or gradient are skipped (counted in nonfinite/skipped_steps); "
        "this many in a row stop the run")
    max_weight_growth: Optional[float] = option(
        100.0, "divergence that stays finite: the run stops when the policy's weight norm (policy/weight_norm, L2 over "
        "every trained weight) exceeds this many times its value at the start of the run; None = no bound")

    def validate(self) -> None:
        super().validate()
        for name in ("keep_last", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_weight_growth is not None and not self.max_weight_growth > 1:
            raise ConfigError(f"max_weight_growth must be > 1 (or None for no bound), got {self.max_weight_growth}")
