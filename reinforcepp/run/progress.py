"""A progress bar with the key numbers of a run (step, reward, KL, tokens/s, ETA)."""

from __future__ import annotations

import sys
from typing import Mapping, Optional


class Progress:
    """``tqdm`` over steps; ``update(metrics)`` advances one step and shows chosen metrics.
    Disabled (silent) when ``enabled`` is False."""

    def __init__(
        self, total: int, initial: int = 0, desc: str = "train", keys: Optional[Mapping[str, str]] = None,
        enabled: bool = True,
    ) -> None:
        from tqdm.auto import tqdm

        self.keys = dict(keys or {})
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True)

    def update(self, metrics: Mapping[str, float], n: int = 1) -> None:
        shown = {label: f"{metrics[key]:.4g}" for key, label in self.keys.items() if key in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(n)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
