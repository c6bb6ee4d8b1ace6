"""Language-model training with REINFORCE++ and its sibling estimators.

``from reinforcepp.lm import Trainer, LMConfig`` for the Python API; ``reinforcepp train``
for the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Trainer", "LMConfig", "sft"]

if TYPE_CHECKING:
    from .config import LMConfig
    from .trainer import Trainer


def __getattr__(name: str) -> Any:  # lazy: importing reinforcepp.lm stays cheap
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name == "LMConfig":
        from .config import LMConfig

        return LMConfig
    raise AttributeError(name)
