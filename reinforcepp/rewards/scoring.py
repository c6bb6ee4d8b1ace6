"""The scorer: calls every reward source on a batch, validates each output, handles failures
(raise, or drop and count) and combines the sources into ``rewards = sum_s weight_s * r_s``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from .base import (
    RESERVED_ARGUMENTS,
    OnError,
    RewardConfigError,
    RewardError,
    RewardResult,
    RewardSource,
    function_name,
)
from .calling import (
    as_float,
    as_list,
    call_reward_function,
    describe_bad,
    reward_kwargs,
)

logger = logging.getLogger(__name__)

# --- the scorer -------------------------------------------------------------------------------


def _unique_names(names: Sequence[str]) -> list[str]:
    """``["acc", "acc", "fmt"] -> ["acc", "acc_2", "fmt"]``."""
    out: list[str] = []
    taken: set[str] = set(names)
    seen: set[str] = set()
    for name in names:
        if name not in seen:
            out.append(name)
            seen.add(name)
            continue
        k = 2
        while f"{name}_{k}" in taken or f"{name}_{k}" in seen:
            k += 1
        new = f"{name}_{k}"
        out.append(new)
        seen.add(new)
    return out


class RewardScorer:
    """Scores completions with weighted reward sources and validates every output.

    ``__call__`` returns ``rewards = sum_s weight_s * r_s`` (shape ``(N,)``) and each ``r_s``.

    Failures, per source (every message names the source, the function and the sample
    indices where they are known):

    - an exception inside the function: the batch is called again one sample at a time to find
      the failing sample (skipped when the function sets ``per_sample_retry = False``, as
      :class:`RemoteReward` does; per-sample adapters such as :func:`from_verl` report the index
      themselves);
    - a result of the wrong length (``expected N, got M``);
    - ``None``, NaN, inf or a non-number at some samples.

    ``on_error="raise"`` raises :class:`RewardError` (chained from the original exception).
    ``on_error="drop"`` marks the failed samples in ``RewardResult.dropped`` (their reward is 0),
    counts them per source (``RewardResult.dropped_per_source`` and the running totals
    ``self.dropped_counts``) and logs a warning. A wrong length or a batch-level exception is
    resolved by the per-sample calls: the samples that still fail alone are dropped; when
    per-sample calls are not allowed, the whole batch is dropped for that source. Errors of
    configuration (a required argument no column provides, a column named ``prompts``) raise in
    both modes.
    """

    def __init__(self, sources: list[RewardSource], on_error: OnError = "raise") -> None:
        if not sources:
            raise ValueError("RewardScorer needs at least one reward source")
        if on_error not in ("raise", "drop"):
            raise ValueError(f"on_error must be 'raise' or 'drop', got {on_error!r}")
        for s in sources:
            if not callable(s.fn):
                raise RewardError(f"reward source {s.name!r}: fn is not callable ({type(s.fn).__name__})")
            if not math.isfinite(float(s.weight)):
                raise RewardError(f"reward source {s.name!r}: weight must be finite, got {s.weight}")
        names = _unique_names([s.name for s in sources])
        self.sources = [RewardSource(n, s.fn, float(s.weight)) for n, s in zip(names, sources)]
        self.on_error: OnError = on_error
        self.dropped_counts: dict[str, int] = {n: 0 for n in names}
        """Running totals of dropped samples per source, over all calls."""

    @property
    def names(self) -> list[str]:
        """Unique source names, in order."""
        return [s.name for s in self.sources]

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardResult:
        """Score ``N = len(completions)`` completions.

        Args:
            prompts: ``N`` prompt strings, aligned with ``completions``.
            completions: ``N`` completion strings.
            columns: extra dataset columns, each a list of ``N`` values aligned with
                ``completions`` (repeat a prompt's row for each of its samples).
        """
        n = len(completions)
        if len(prompts) != n:
            raise RewardConfigError(f"got {len(prompts)} prompts for {n} completions")
        for key, values in columns.items():
            if key in RESERVED_ARGUMENTS:
                raise RewardConfigError(f"a dataset column may not be named {key!r}: the scorer passes {key} itself")
            if len(values) != n:
                raise RewardConfigError(f"column {key!r} has {len(values)} values for {n} completions")

        total = torch.zeros(n, dtype=torch.float64)
        dropped = torch.zeros(n, dtype=torch.bool)
        per_source: dict[str, torch.Tensor] = {}
        dropped_per_source: dict[str, int] = {}
        for source in self.sources:
            values, bad = self._score_source(source, prompts, completions, columns)
            r = torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float64)
            per_source[source.name] = r.to(torch.float32)
            total += source.weight * r
            if bad:
                dropped[list(bad)] = True
                dropped_per_source[source.name] = len(bad)
                self.dropped_counts[source.name] += len(bad)
                logger.warning(
                    "reward source %r (%s): dropped %d of %d samples: %s",
                    source.name, function_name(source.fn), len(bad), n, describe_bad(bad),
                )
        total[dropped] = 0.0
        return RewardResult(
            rewards=total.to(torch.float32),
            per_source=per_source,
            dropped=dropped,
            dropped_per_source=dropped_per_source,
        )

    # One source: returns (values with None at bad samples, {index: reason}); raises in raise mode.
    def _score_source(
        self, source: RewardSource, prompts: list[str], completions: list[str], columns: dict[str, list]
    ) -> tuple[list[float | None], dict[int, str]]:
        n = len(completions)
        where = f"reward source {source.name!r} ({function_name(source.fn)})"
        try:
            kwargs = reward_kwargs(source.fn, prompts, completions, columns)
            out = source.fn(**kwargs)
        except RewardConfigError as exc:
            raise RewardConfigError(f"{where}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            return self._on_exception(source, where, exc, prompts, completions, columns)

        values = as_list(out)
        if values is None or len(values) != n:
            got = f"{len(values)} values" if values is not None else f"a {type(out).__name__}"
            msg = f"{where} returned {got}; expected a list of {n} floats (one per completion)"
            if self.on_error == "raise":
                raise RewardError(msg)
            return self._per_sample(source, prompts, completions, columns, msg)
        return self._check_values(where, values)

    def _check_values(self, where: str, raw: Sequence[Any]) -> tuple[list[float | None], dict[int, str]]:
        values: list[float | None] = []
        bad: dict[int, str] = {}
        for i, v in enumerate(raw):
            x, reason = as_float(v)
            values.append(x)
            if reason is not None:
                bad[i] = reason
        if bad and self.on_error == "raise":
            raise RewardError(f"{where} returned invalid rewards at {describe_bad(bad)}", indices=list(bad))
        return values, bad

    def _on_exception(
        self,
        source: RewardSource,
        where: str,
        exc: Exception,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, list],
    ) -> tuple[list[float | None], dict[int, str]]:
        n = len(completions)
        known = exc.indices if isinstance(exc, RewardError) else None
        partial = exc.values if isinstance(exc, RewardError) else None
        if self.on_error == "raise":
            if known:
                raise RewardError(
                    f"{where} failed on sample {known[0]}"
                    + (f" (failing samples: {list(known)})" if len(known) > 1 else "")
                    + f": {exc.__cause__ or exc!r}",
                    indices=known,
                ) from exc
            if not getattr(source.fn, "per_sample_retry", True):
                raise RewardError(f"{where} failed on the batch of {n} samples: {exc!r}") from exc
            for i in range(n):  # find the first sample that fails alone
                try:
                    out = call_reward_function(source.fn, *_sample(i, prompts, completions, columns))
                except Exception as sample_exc:
                    raise RewardError(f"{where} failed on sample {i}: {sample_exc!r}", indices=[i]) from sample_exc
                vals = as_list(out)
                if vals is None or len(vals) != 1 or as_float(vals[0])[1] is not None:
                    raise RewardError(
                        f"{where} failed on the batch ({exc!r}) and returned {out!r} for sample {i} alone",
                        indices=[i],
                    ) from exc
            raise RewardError(
                f"{where} failed on the batch of {n} samples but on no single sample: {exc!r}"
            ) from exc

        # drop mode
        if partial is not None and len(partial) == n:
            values, bad = self._check_values(where, partial)
            for i in known or ():
                bad[i] = f"raised {exc.__cause__ or exc!r}"
            return values, bad
        return self._per_sample(source, prompts, completions, columns, f"{where} raised {exc!r}")

    def _per_sample(
        self,
        source: RewardSource,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, list],
        batch_failure: str,
    ) -> tuple[list[float | None], dict[int, str]]:
        """Drop mode, after the batch call failed: call the source once per sample; the samples
        that fail alone are bad (all of them when the source forbids per-sample calls)."""
        n = len(completions)
        if not getattr(source.fn, "per_sample_retry", True):
            logger.warning("%s; dropping the batch (no per-sample calls for this source)", batch_failure)
            return [None] * n, {i: "the batch call failed" for i in range(n)}
        logger.warning("%s; scoring its samples one at a time", batch_failure)
        values: list[float | None] = []
        bad: dict[int, str] = {}
        for i in range(n):
            try:
                out = call_reward_function(source.fn, *_sample(i, prompts, completions, columns))
            except RewardConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - user code may raise anything
                values.append(None)
                bad[i] = f"raised {exc!r}"
                continue
            vals = as_list(out)
            if vals is None or len(vals) != 1:
                values.append(None)
                bad[i] = f"returned {out!r:.60} for one sample"
                continue
            x, reason = as_float(vals[0])
            values.append(x)
            if reason is not None:
                bad[i] = reason
        return values, bad


def _sample(
    i: int, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> tuple[list[str], list[str], dict[str, list]]:
    return [prompts[i]], [completions[i]], {k: [v[i]] for k, v in columns.items()}
