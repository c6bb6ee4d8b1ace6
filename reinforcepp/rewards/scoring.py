"""The scorer: calls every reward source on a batch, validates each output, handles failures
(raise, or drop and count) and combines the sources into ``rewards = sum_s weight_s * r_s``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Union

import torch

from .base import (
    RESERVED_ARGUMENTS,
    OnError,
    RewardConfigError,
    RewardError,
    RewardExitError,
    RewardResult,
    RewardSource,
    RewardTimeoutError,
    TrainerState,
    function_name,
)
from .calling import (
    PendingCall,
    RewardBatch,
    as_list,
    as_value,
    call_bounded,
    describe_bad,
    split_output,
)

logger = logging.getLogger(__name__)

Value = Union[float, list[float], None]  # noqa: UP007 - a runtime alias


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
    A source returning ``None`` for a sample does not score it (TRL's convention): the sample's
    sum runs over the sources that scored it, and a sample that no source scores is dropped
    (``RewardResult.unscored``, in both ``on_error`` modes).

    The sources run concurrently, each call in its own thread (``async def`` functions in an
    event loop of their own; a URL source's request in its thread), and each call is bounded by
    ``timeout`` seconds (:class:`RewardTimeoutError`, naming the source, in both modes). A call
    that tries to end the process (``sys.exit``, ``os._exit``) raises :class:`RewardExitError`,
    naming the source, in both modes.
    ``concurrent=False`` runs them one after another (still bounded).

    Failures, per source (every message names the source, the function and the sample
    indices where they are known):

    - an exception inside the function: the batch is called again one sample at a time to find
      the failing sample (skipped when the function sets ``per_sample_retry = False``, as
      :class:`RemoteReward` does; per-sample adapters such as :func:`from_verl` report the index
      themselves);
    - a result of the wrong length (``expected N, got M``);
    - NaN, inf, a number beyond the float32 range or a non-number at some samples.

    ``on_error="raise"`` raises :class:`RewardError` (chained from the original exception).
    ``on_error="drop"`` marks the failed samples in ``RewardResult.dropped`` (their reward is 0),
    counts them per source (``RewardResult.dropped_per_source`` and the running totals
    ``self.dropped_counts``) and logs a warning. A wrong length or a batch-level exception is
    resolved by the per-sample calls: the samples that still fail alone are dropped; when
    per-sample calls are not allowed, the whole batch is dropped for that source. Errors of
    configuration (a required argument no column provides, a column named ``prompts``) raise in
    both modes.

    A source may return, for every sample, a list of numbers instead of one (a process reward):
    those lists are returned in ``RewardResult.token_rewards`` (unweighted) for the trainer to
    place on tokens; ``per_source`` then holds each list's sum, and such a source adds nothing to
    ``rewards``.
    """

    def __init__(
        self,
        sources: list[RewardSource],
        on_error: OnError = "raise",
        *,
        timeout: float | None = None,
        concurrent: bool = True,
    ) -> None:
        if not sources:
            raise ValueError("RewardScorer needs at least one reward source")
        if on_error not in ("raise", "drop"):
            raise ValueError(f"on_error must be 'raise' or 'drop', got {on_error!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        for s in sources:
            if not callable(s.fn):
                raise RewardError(f"reward source {s.name!r}: fn is not callable ({type(s.fn).__name__})")
            if not math.isfinite(float(s.weight)):
                raise RewardError(f"reward source {s.name!r}: weight must be finite, got {s.weight}")
        names = _unique_names([s.name for s in sources])
        self.sources = [RewardSource(n, s.fn, float(s.weight)) for n, s in zip(names, sources)]
        self.on_error: OnError = on_error
        self.timeout = timeout
        self.concurrent = concurrent
        self.dropped_counts: dict[str, int] = {n: 0 for n in names}
        """Running totals of dropped samples per source, over all calls."""
        self.unscored_count = 0
        """Running total of samples that no source scored."""

    @property
    def names(self) -> list[str]:
        """Unique source names, in order."""
        return [s.name for s in self.sources]

    def where(self, source: RewardSource) -> str:
        return f"reward source {source.name!r} ({function_name(source.fn)})"

    def check_columns(self, columns: Sequence[str]) -> None:
        """Before training: each source's required arguments are columns of the dataset
        (:func:`~reinforcepp.rewards.calling.check_columns`)."""
        from .calling import check_columns

        for source in self.sources:
            check_columns(source.fn, columns, self.where(source))

    def __call__(
        self,
        prompts: list[Any],
        completions: list[str],
        columns: dict[str, list],
        *,
        completion_ids: list[list[int]] | None = None,
        trainer_state: TrainerState | None = None,
        chat_prompts: list[Any] | None = None,
    ) -> RewardResult:
        """Score ``N = len(completions)`` completions.

        Args:
            prompts: ``N`` prompt strings, aligned with ``completions``.
            completions: ``N`` completion strings.
            columns: extra dataset columns, each a list of ``N`` values aligned with
                ``completions`` (repeat a prompt's row for each of its samples).
            completion_ids: ``N`` token-id lists, for functions that take ``completion_ids``.
            trainer_state: for functions that take ``trainer_state``.
            chat_prompts: the ``N`` conversational prompts (lists of messages) when the prompts
                were conversational: functions then get them as ``prompts`` and each completion
                as ``[{"role": "assistant", "content": text}]``.
        """
        n = len(completions)
        for what, got in (("prompts", prompts), ("completion_ids", completion_ids), ("chat_prompts", chat_prompts)):
            if got is not None and len(got) != n:
                raise RewardConfigError(f"got {len(got)} {what} for {n} completions")
        for key, values in columns.items():
            if key in RESERVED_ARGUMENTS:
                raise RewardConfigError(f"a dataset column may not be named {key!r}: the scorer passes {key} itself")
            if len(values) != n:
                raise RewardConfigError(f"column {key!r} has {len(values)} values for {n} completions")
        batch = RewardBatch(list(prompts), list(completions), columns, completion_ids, trainer_state, chat_prompts)

        calls: list[PendingCall | None] = [None] * len(self.sources)
        for j, source in enumerate(self.sources):
            if self.concurrent or j == 0:
                calls[j] = self._start(source, batch)
        total = torch.zeros(n, dtype=torch.float64)
        scored = torch.zeros(n, dtype=torch.bool)
        dropped = torch.zeros(n, dtype=torch.bool)
        result = RewardResult(total, {}, dropped)
        for j, source in enumerate(self.sources):
            call = calls[j] or self._start(source, batch)
            values, bad, extras = self._score_source(source, batch, call)
            for key, value in extras.items():
                mean = _mean_of(value)
                if mean is not None:
                    result.extras[f"{source.name}/{key}"] = mean
            is_list = [isinstance(v, list) for v in values]
            if any(is_list):
                if not all(f or v is None for f, v in zip(is_list, values)):
                    raise RewardError(f"{self.where(source)} returned lists for some samples and numbers for others")
                result.token_rewards[source.name] = [v if isinstance(v, list) else None for v in values]
                r = torch.tensor([math.fsum(v) if isinstance(v, list) else math.nan for v in values],
                                 dtype=torch.float64)
            else:
                r = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
                total += torch.where(r.isnan(), 0.0, source.weight * r)
            if bad:
                r[list(bad)] = 0.0
                dropped[list(bad)] = True
                result.dropped_per_source[source.name] = len(bad)
                self.dropped_counts[source.name] += len(bad)
                logger.warning(
                    "%s: dropped %d of %d samples: %s", self.where(source), len(bad), n, describe_bad(bad),
                )
            scored |= ~r.isnan()
            result.per_source[source.name] = r.to(torch.float32)
        unscored = ~scored
        self.unscored_count += int(unscored.sum())
        dropped |= unscored
        total[dropped] = 0.0
        result.rewards = total.to(torch.float32)
        result.unscored = unscored
        return result

    def _start(self, source: RewardSource, batch: RewardBatch) -> PendingCall:
        try:
            kwargs = batch.kwargs_for(source.fn)
        except RewardConfigError as exc:
            raise RewardConfigError(f"{self.where(source)}: {exc}") from exc
        return PendingCall(source.fn, kwargs, self.timeout, self.where(source))

    # One source: (values with None at unscored and bad samples, {index: reason}, extra logs);
    # raises in raise mode.
    def _score_source(
        self, source: RewardSource, batch: RewardBatch, call: PendingCall
    ) -> tuple[list[Value], dict[int, str], dict[str, Any]]:
        n = len(batch)
        where = self.where(source)
        try:
            out, extras = split_output(call.result())
        except (RewardConfigError, RewardTimeoutError, RewardExitError) as exc:
            if isinstance(exc, (RewardTimeoutError, RewardExitError)) or where in str(exc):
                raise
            raise RewardConfigError(f"{where}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            values, bad = self._on_exception(source, where, exc, batch)
            return values, bad, {}

        raw = as_list(out)
        if raw is None or len(raw) != n:
            got = f"{len(raw)} values" if raw is not None else f"a {type(out).__name__}"
            msg = f"{where} returned {got}; expected a list of {n} floats (one per completion)"
            if self.on_error == "raise":
                raise RewardError(msg)
            return (*self._per_sample(source, batch, msg), extras)
        return (*self._check_values(where, raw), extras)

    def _check_values(self, where: str, raw: Sequence[Any]) -> tuple[list[Value], dict[int, str]]:
        values: list[Value] = []
        bad: dict[int, str] = {}
        for i, v in enumerate(raw):
            x, reason = as_value(v)
            values.append(x)
            if reason is not None:
                bad[i] = reason
        if bad and self.on_error == "raise":
            raise RewardError(f"{where} returned invalid rewards at {describe_bad(bad)}", indices=list(bad))
        return values, bad

    def _call_one(self, source: RewardSource, batch: RewardBatch, i: int) -> Any:
        out, _ = split_output(call_bounded(source.fn, batch.sample(i), self.timeout, self.where(source)))
        return out

    def _on_exception(
        self, source: RewardSource, where: str, exc: Exception, batch: RewardBatch
    ) -> tuple[list[Value], dict[int, str]]:
        n = len(batch)
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
                    out = self._call_one(source, batch, i)
                except (RewardTimeoutError, RewardExitError):
                    raise
                except Exception as sample_exc:
                    raise RewardError(f"{where} failed on sample {i}: {sample_exc!r}", indices=[i]) from sample_exc
                vals = as_list(out)
                if vals is None or len(vals) != 1 or as_value(vals[0])[1] is not None:
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
        return self._per_sample(source, batch, f"{where} raised {exc!r}")

    def _per_sample(
        self, source: RewardSource, batch: RewardBatch, batch_failure: str
    ) -> tuple[list[Value], dict[int, str]]:
        """Drop mode, after the batch call failed: call the source once per sample; the samples
        that fail alone are bad (all of them when the source forbids per-sample calls)."""
        n = len(batch)
        if not getattr(source.fn, "per_sample_retry", True):
            logger.warning("%s; dropping the batch (no per-sample calls for this source)", batch_failure)
            return [None] * n, {i: "the batch call failed" for i in range(n)}
        logger.warning("%s; scoring its samples one at a time", batch_failure)
        values: list[Value] = []
        bad: dict[int, str] = {}
        for i in range(n):
            try:
                out = self._call_one(source, batch, i)
            except (RewardConfigError, RewardTimeoutError, RewardExitError):
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
            x, reason = as_value(vals[0])
            values.append(x)
            if reason is not None:
                bad[i] = reason
        return values, bad


def _mean_of(value: Any) -> float | None:
    """Mean of an extra metric (a number, or a list / tensor of numbers); ``None`` when it is
    not numeric or has no finite entry."""
    try:
        t = torch.as_tensor(value, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        return None
    t = t[t.isfinite()]
    return float(t.mean()) if t.numel() else None
