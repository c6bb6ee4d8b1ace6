"""Reward sources for language-model training: one signature, loaded from a spec string, scored
and validated in one place.

Every reward source is a function in the TRL convention::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

called with keyword arguments. ``columns`` are the extra dataset columns of the batch (say
``answer``), each a list aligned with ``completions``; a function receives only the columns it
names as parameters, or all of them when it takes ``**kwargs``. It returns one finite float per
completion (the scalar ``rewards`` of the responses).

:class:`RewardScorer` calls every :class:`RewardSource`, checks each output (length, ``None``,
NaN/inf, exceptions, each error naming the source and the sample index) and combines them:

    ``rewards_i = sum_s weight_s * r_s,i``    shape ``(N,)``, ``N = len(completions)``.

Sources come from spec strings (:func:`load_reward_source`): ``module.sub:function``,
``path/to/file.py:function``, ``verl:<module-or-file>[:compute_score]``,
``openrlhf:<module-or-file>[:reward_func]``, ``rm:<path-or-hub-name>`` (a sequence-classification
reward model, :class:`RewardModel`) and ``http(s)://...`` (a reward server, :class:`RemoteReward`).
docs/lm.md ("Rewards") documents the protocols.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import numbers
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from ..errors import InputError

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]
"""``fn(prompts=list[str], completions=list[str], **columns) -> Sequence[float]`` (TRL convention)."""

OnError = Literal["raise", "drop"]

RESERVED_ARGUMENTS = ("prompts", "completions")
"""Argument names the scorer fills itself; a dataset column may not use them."""


class RewardError(InputError, ValueError):
    """A reward source could not be loaded, or failed / returned bad values on a batch.

    Attributes:
        indices: sample indices (into the batch) that failed, when known; ``None`` when the
            failure concerns the whole call.
        values: partial per-sample results of a per-sample adapter (``None`` at the failed
            indices), so that drop mode need not call the function again; ``None`` otherwise.
    """

    def __init__(
        self,
        message: str,
        *,
        indices: Optional[Sequence[int]] = None,
        values: Optional[Sequence[Any]] = None,
    ) -> None:
        super().__init__(message)
        self.indices = None if indices is None else tuple(indices)
        self.values = None if values is None else list(values)


class RewardConfigError(RewardError):
    """A configuration error rather than a failure on some samples (a required argument that no
    column provides, a column named ``prompts``): raised in both ``on_error`` modes and never
    retried per sample. Reward functions may raise it too (the verl adapter does when the
    ground-truth column is missing)."""


@dataclass
class RewardSource:
    """One named, weighted reward function.

    Attributes:
        name: name in logs and error messages (``reward/<name>``); made unique by
            :class:`RewardScorer` (``acc``, ``acc_2``, ...).
        fn: the reward function, TRL convention (module docstring).
        weight: ``w_s`` in ``rewards = sum_s w_s * r_s``.
    """

    name: str
    fn: RewardFn
    weight: float = 1.0


@dataclass
class RewardResult:
    """The scores of one batch of ``N`` completions.

    Attributes:
        rewards: ``(N,)`` float32, ``sum_s weight_s * r_s``; exactly 0 where ``dropped``.
        per_source: name -> ``(N,)`` float32 unweighted ``r_s``; 0 where that source failed.
        dropped: ``(N,)`` bool, samples on which any source failed (``on_error="drop"`` only;
            all False in raise mode). The trainer must mask them out of the loss.
        dropped_per_source: name -> number of samples that source failed on in this batch.
    """

    rewards: torch.Tensor
    per_source: dict[str, torch.Tensor]
    dropped: torch.Tensor
    dropped_per_source: dict[str, int] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        """Number of dropped samples in the batch."""
        return int(self.dropped.sum().item())


# --- calling a reward function ----------------------------------------------------------------


def _function_name(fn: Any) -> str:
    """``module.qualname`` of a function, the description of an adapter, or the class name of a
    callable object."""
    display = getattr(fn, "display_name", None)
    if isinstance(display, str):
        return display
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def _short_name(fn: Any, default: str) -> str:
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name and name != "<lambda>":
        return name
    return default


def _accepted_arguments(fn: Callable[..., Any]) -> tuple[Optional[set[str]], set[str]]:
    """``(names, required)``: the keyword-passable parameter names of ``fn`` (``None`` when it
    takes ``**kwargs`` or cannot be inspected: pass everything) and those without a default."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, set()
    names: set[str] = set()
    required: set[str] = set()
    var_keyword = False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty:
            raise RewardConfigError(
                f"reward function {_function_name(fn)} has positional-only parameter {p.name!r}; "
                "reward functions are called with keyword arguments (prompts=, completions=, columns)"
            )
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(p.name)
            if p.default is inspect.Parameter.empty:
                required.add(p.name)
    return (None if var_keyword else names), required


def reward_kwargs(
    fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> dict[str, Any]:
    """The keyword arguments of a TRL-convention call of ``fn``: ``prompts``, ``completions`` and
    the columns it accepts by name (all of them when it takes ``**kwargs`` or has no inspectable
    signature).

    Raises:
        RewardConfigError: a required parameter of ``fn`` is neither ``prompts``,
            ``completions`` nor a column of the batch.
    """
    available = {"prompts": prompts, "completions": completions, **columns}
    names, required = _accepted_arguments(fn)
    missing = sorted(required - available.keys())
    if missing:
        raise RewardConfigError(
            f"reward function {_function_name(fn)} requires argument(s) {missing}, but the batch "
            f"provides only prompts, completions and the columns {sorted(columns)}"
        )
    return available if names is None else {k: v for k, v in available.items() if k in names}


def call_reward_function(
    fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> Sequence[Any]:
    """``fn(**reward_kwargs(fn, prompts, completions, columns))``, unvalidated."""
    return fn(**reward_kwargs(fn, prompts, completions, columns))


# --- output validation ------------------------------------------------------------------------


def _as_list(out: Any) -> Optional[list[Any]]:
    """A reward function's output as a Python list (tensor / ndarray / sequence); ``None`` when
    it is not a 1-D sequence."""
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu", torch.float64).tolist() if out.ndim == 1 else None
    if hasattr(out, "ndim") and hasattr(out, "tolist"):  # numpy array
        return out.tolist() if out.ndim == 1 else None
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        return None
    return list(out)


def _as_float(value: Any) -> tuple[Optional[float], Optional[str]]:
    """``(float, None)`` for a finite real number (bool, int, float, numpy / 0-d tensor scalar),
    ``(None, reason)`` otherwise."""
    if value is None:
        return None, "None"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None, f"a tensor of shape {tuple(value.shape)}"
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None, f"a {type(value).__name__} ({value!r:.40})"
    x = float(value)
    if math.isnan(x):
        return None, "NaN"
    if math.isinf(x):
        return None, "inf" if x > 0 else "-inf"
    return x, None


def _describe_bad(bad: dict[int, str], limit: int = 8) -> str:
    items = sorted(bad.items())
    text = ", ".join(f"sample {i}: {reason}" for i, reason in items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items)} in all)"
    return text


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
                    source.name, _function_name(source.fn), len(bad), n, _describe_bad(bad),
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
    ) -> tuple[list[Optional[float]], dict[int, str]]:
        n = len(completions)
        where = f"reward source {source.name!r} ({_function_name(source.fn)})"
        try:
            kwargs = reward_kwargs(source.fn, prompts, completions, columns)
            out = source.fn(**kwargs)
        except RewardConfigError as exc:
            raise RewardConfigError(f"{where}: {exc}") from exc
        except Exception as exc:
            return self._on_exception(source, where, exc, prompts, completions, columns)

        values = _as_list(out)
        if values is None or len(values) != n:
            got = f"{len(values)} values" if values is not None else f"a {type(out).__name__}"
            msg = f"{where} returned {got}; expected a list of {n} floats (one per completion)"
            if self.on_error == "raise":
                raise RewardError(msg)
            return self._per_sample(source, prompts, completions, columns, msg)
        return self._check_values(where, values)

    def _check_values(self, where: str, raw: Sequence[Any]) -> tuple[list[Optional[float]], dict[int, str]]:
        values: list[Optional[float]] = []
        bad: dict[int, str] = {}
        for i, v in enumerate(raw):
            x, reason = _as_float(v)
            values.append(x)
            if reason is not None:
                bad[i] = reason
        if bad and self.on_error == "raise":
            raise RewardError(f"{where} returned invalid rewards at {_describe_bad(bad)}", indices=list(bad))
        return values, bad

    def _on_exception(
        self,
        source: RewardSource,
        where: str,
        exc: Exception,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, list],
    ) -> tuple[list[Optional[float]], dict[int, str]]:
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
                vals = _as_list(out)
                if vals is None or len(vals) != 1 or _as_float(vals[0])[1] is not None:
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
    ) -> tuple[list[Optional[float]], dict[int, str]]:
        """Drop mode, after the batch call failed: call the source once per sample; the samples
        that fail alone are bad (all of them when the source forbids per-sample calls)."""
        n = len(completions)
        if not getattr(source.fn, "per_sample_retry", True):
            logger.warning("%s; dropping the batch (no per-sample calls for this source)", batch_failure)
            return [None] * n, {i: "the batch call failed" for i in range(n)}
        logger.warning("%s; scoring its samples one at a time", batch_failure)
        values: list[Optional[float]] = []
        bad: dict[int, str] = {}
        for i in range(n):
            try:
                out = call_reward_function(source.fn, *_sample(i, prompts, completions, columns))
            except RewardConfigError:
                raise
            except Exception as exc:
                values.append(None)
                bad[i] = f"raised {exc!r}"
                continue
            vals = _as_list(out)
            if vals is None or len(vals) != 1:
                values.append(None)
                bad[i] = f"returned {out!r:.60} for one sample"
                continue
            x, reason = _as_float(vals[0])
            values.append(x)
            if reason is not None:
                bad[i] = reason
        return values, bad


def _sample(
    i: int, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> tuple[list[str], list[str], dict[str, list]]:
    return [prompts[i]], [completions[i]], {k: [v[i]] for k, v in columns.items()}


# --- adapters for verl and OpenRLHF -----------------------------------------------------------


class _VerlAdapter:
    """verl's per-sample ``compute_score`` as a TRL-convention reward function."""

    def __init__(
        self, compute_score: Callable[..., Any], data_source_column: str, ground_truth_column: str, extra_info_column: str
    ) -> None:
        self.compute_score = compute_score
        self.data_source_column = data_source_column
        self.ground_truth_column = ground_truth_column
        self.extra_info_column = extra_info_column
        self.__name__ = _short_name(compute_score, "compute_score")
        self.display_name = f"from_verl({_function_name(compute_score)})"

    def _ground_truths(self, n: int, columns: dict[str, list]) -> list[Any]:
        if self.ground_truth_column in columns:
            return list(columns[self.ground_truth_column])
        if "reward_model" in columns and all(
            isinstance(r, dict) and "ground_truth" in r for r in columns["reward_model"]
        ):  # verl's own parquet layout: reward_model = {"style": ..., "ground_truth": ...}
            return [r["ground_truth"] for r in columns["reward_model"]]
        if "answer" in columns:
            return list(columns["answer"])
        raise RewardConfigError(
            f"verl reward {_function_name(self.compute_score)} needs a ground truth: the batch has no column "
            f"{self.ground_truth_column!r} (nor 'reward_model' with 'ground_truth', nor 'answer'); "
            f"columns: {sorted(columns)}"
        )

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> list[Any]:
        n = len(completions)
        ground_truths = self._ground_truths(n, columns)
        data_sources = columns.get(self.data_source_column, [""] * n)
        extra_infos = columns.get(self.extra_info_column, [None] * n)
        values: list[Any] = []
        failed: list[int] = []
        first: Optional[BaseException] = None
        for i in range(n):
            try:
                out = self.compute_score(
                    data_source=data_sources[i],
                    solution_str=completions[i],
                    ground_truth=ground_truths[i],
                    extra_info=extra_infos[i],
                )
                if isinstance(out, dict):
                    if "score" not in out:
                        raise KeyError(f"compute_score returned a dict without 'score' (keys {sorted(out)})")
                    out = out["score"]
            except Exception as exc:
                values.append(None)
                failed.append(i)
                first = first or exc
                continue
            values.append(float(out) if isinstance(out, bool) else out)
        if failed:
            raise RewardError(
                f"verl compute_score {_function_name(self.compute_score)} failed on sample {failed[0]}: {first!r}",
                indices=failed,
                values=values,
            ) from first
        return values


def from_verl(
    compute_score: Callable[..., Any],
    data_source_column: str = "data_source",
    ground_truth_column: str = "ground_truth",
    extra_info_column: str = "extra_info",
) -> RewardFn:
    """Wrap a verl reward function as a TRL-convention :data:`RewardFn`.

    verl calls ``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)``
    once per response and accepts a number or a dict with key ``"score"``; the wrapper does the
    same, unchanged (keyword arguments, as verl's reward managers pass them).

    Columns: ``data_source`` (missing: ``""``), ``ground_truth`` (missing: ``reward_model[i]
    ["ground_truth"]`` as in verl's parquet files, else ``answer``, else :class:`RewardError`),
    ``extra_info`` (missing: ``None``). A sample that raises is reported by index
    (:class:`RewardError` with ``indices``, chained from the first exception).
    """
    return _VerlAdapter(compute_score, data_source_column, ground_truth_column, extra_info_column)


class _OpenRLHFAdapter:
    """OpenRLHF's batched ``reward_func(queries, prompts, labels)`` as a TRL-convention function."""

    def __init__(self, reward_func: Callable[..., Any], label_column: str) -> None:
        self.reward_func = reward_func
        self.label_column = label_column
        self.__name__ = _short_name(reward_func, "reward_func")
        self.display_name = f"from_openrlhf({_function_name(reward_func)})"

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> Any:
        n = len(completions)
        queries = [p + c for p, c in zip(prompts, completions)]
        if self.label_column in columns:
            labels = list(columns[self.label_column])
        elif "answer" in columns:
            labels = list(columns["answer"])
        else:
            labels = [None] * n
        out = self.reward_func(queries, list(prompts), labels)
        if isinstance(out, dict):
            if "rewards" not in out:
                raise RewardError(
                    f"OpenRLHF reward_func {_function_name(self.reward_func)} returned a dict without "
                    f"'rewards' (keys {sorted(out)})"
                )
            out = out["rewards"]
        return out


def from_openrlhf(reward_func: Callable[..., Any], label_column: str = "label") -> RewardFn:
    """Wrap an OpenRLHF custom reward function as a TRL-convention :data:`RewardFn`.

    OpenRLHF calls ``reward_func(queries, prompts, labels)`` on a batch, with ``queries[i] =
    prompts[i] + completions[i]``; it returns a tensor / list of rewards or a dict whose
    ``"rewards"`` holds them (``"scores"`` and ``"extra_logs"`` are ignored here). ``labels`` come
    from the ``label`` column, else ``answer``, else a list of ``None``.
    """
    return _OpenRLHFAdapter(reward_func, label_column)


# --- reward model and remote reward -----------------------------------------------------------


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


class RewardModel:
    """A Hugging Face sequence-classification reward model as a reward function.

    Scores the plain concatenation ``prompt + completion`` (no chat template: pass prompts
    already rendered the way the reward model was trained), tokenised with the model's
    tokenizer (special tokens added, right padding, truncated from the *left* to ``max_length``
    tokens so the end of the completion is kept), and returns logit 0 of the ``num_labels=1``
    head at the last non-pad token. A tokenizer without a pad token gets ``eos`` as pad.

    Args:
        name_or_path: local directory or hub name of an ``AutoModelForSequenceClassification``.
        device: where the model runs.
        dtype: model weights dtype.
        batch_size: texts per forward pass.
        max_length: maximum tokens per text.
        trust_remote_code: passed to ``from_pretrained``.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        max_length: int = 1024,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.name_or_path = str(name_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.display_name = f"RewardModel({self.name_or_path!r})"
        self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.name_or_path, trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype)
        )
        if self.model.config.num_labels != 1:
            raise RewardError(
                f"reward model {self.name_or_path} has num_labels={self.model.config.num_labels}; "
                "a reward model has a single output (num_labels=1)"
            )
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise RewardError(f"reward model tokenizer {self.name_or_path} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


class RemoteReward:
    """A reward server over HTTP (JSON), as a reward function.

    Request: ``POST url`` with body ``{"prompts": [...], "completions": [...], "query":
    [prompt + completion, ...], **columns}`` (``query`` and ``prompts`` as OpenRLHF's remote
    reward model sends them; OpenRLHF's ``labels`` arrive when the dataset column is named
    ``labels``). Response: ``{"rewards": [...]}`` or a plain JSON list, one number per
    completion. With ``batch_size`` the batch is sent in chunks of that many completions.

    A failing request is not retried per sample (``per_sample_retry = False``): in drop mode the
    whole batch is dropped for this source.
    """

    per_sample_retry = False

    def __init__(self, url: str, timeout: float = 60.0, batch_size: int | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward needs an http:// or https:// URL, got {url!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.url = url
        self.timeout = timeout
        self.batch_size = batch_size
        self.display_name = f"RemoteReward({url!r})"

    def _post(self, payload: dict[str, Any]) -> list[Any]:
        try:
            body = json.dumps(payload).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise RewardError(f"remote reward {self.url}: the batch is not JSON-serialisable: {exc}") from exc
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise RewardError(f"remote reward {self.url} answered HTTP {exc.code} {exc.reason}: {detail}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise RewardError(f"remote reward {self.url} could not be reached: {exc}") from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RewardError(f"remote reward {self.url} answered non-JSON: {raw[:200]!r}") from exc
        if isinstance(data, dict) and "rewards" in data:
            data = data["rewards"]
        if not isinstance(data, list):
            raise RewardError(
                f"remote reward {self.url} answered {type(data).__name__}; expected {{'rewards': [...]}} or a list"
            )
        return data

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> list[Any]:
        n = len(completions)
        step = self.batch_size or max(n, 1)
        rewards: list[Any] = []
        for start in range(0, n, step):
            sl = slice(start, start + step)
            p, c = list(prompts[sl]), list(completions[sl])
            payload = {"prompts": p, "completions": c, "query": [a + b for a, b in zip(p, c)]}
            for key, values in columns.items():
                if key in payload:
                    raise RewardError(f"remote reward {self.url}: column {key!r} clashes with a request field")
                payload[key] = list(values[sl])
            got = self._post(payload)
            if len(got) != len(c):
                raise RewardError(
                    f"remote reward {self.url} returned {len(got)} rewards for {len(c)} completions"
                )
            rewards.extend(got)
        return rewards


# --- loading from spec strings ----------------------------------------------------------------


def _load_module_from_file(path_text: str, spec: str) -> ModuleType:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise RewardError(f"reward spec {spec!r}: file {str(path)!r} not found (cwd {Path.cwd()})")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_reinforcepp_reward_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward spec {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        raise RewardError(f"reward spec {spec!r}: executing {str(path)!r} failed: {exc!r}") from exc
    return module


def _import_module(name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise RewardError(
                f"reward spec {spec!r}: module {name!r} is not importable ({exc}); "
                "is it installed or on PYTHONPATH? (a file needs a path ending in .py)"
            ) from exc
        raise RewardError(f"reward spec {spec!r}: importing module {name!r} failed: {exc!r}") from exc
    except Exception as exc:
        raise RewardError(f"reward spec {spec!r}: importing module {name!r} failed: {exc!r}") from exc


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_callable(target: str, attr: str, spec: str) -> Callable[..., Any]:
    module = _load_module_from_file(target, spec) if _is_file_target(target) else _import_module(target, spec)
    if not hasattr(module, attr):
        candidates = [n for n in dir(module) if not n.startswith("_")]
        near = difflib.get_close_matches(attr, candidates, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RewardError(f"reward spec {spec!r}: {target!r} has no attribute {attr!r}{hint}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardError(f"reward spec {spec!r}: {target}:{attr} is a {type(fn).__name__}, not callable")
    return fn


def _split_target(rest: str, default_attr: str, spec: str) -> tuple[str, str]:
    target, sep, attr = rest.rpartition(":")
    if not sep:
        target, attr = rest, default_attr
    if not target or not attr:
        raise RewardError(f"reward spec {spec!r}: expected '<module-or-file>:<function>'")
    return target, attr


def load_reward_source(
    spec: str, weight: float = 1.0, *, reward_model_kwargs: Optional[dict[str, Any]] = None
) -> RewardSource:
    """Build a :class:`RewardSource` from a spec string.

    Spec forms:

    - ``module.sub:function``: a function of an importable module;
    - ``path/to/file.py:function``: a function of a Python file (loaded by path; a target with
      ``/`` or ending in ``.py`` is a file);
    - ``verl:<module-or-file>[:compute_score]``: a verl ``compute_score``, via :func:`from_verl`;
    - ``openrlhf:<module-or-file>[:reward_func]``: an OpenRLHF ``reward_func``, via
      :func:`from_openrlhf`;
    - ``rm:<path-or-hub-name>``: a sequence-classification reward model (:class:`RewardModel`,
      default arguments);
    - ``http://...`` / ``https://...``: a reward server (:class:`RemoteReward`).

    The name is the function's name (``compute_score`` for verl), or the spec for ``rm:`` and
    URLs. ``reward_model_kwargs`` (``device``, ``dtype``, ``batch_size``, ``max_length``,
    ``trust_remote_code``) go to :class:`RewardModel` for an ``rm:`` spec; they are an error with
    any other spec.

    Raises:
        RewardError: file not found, module not importable, attribute missing (the nearest name
            is suggested), not callable, malformed spec.
    """
    spec = spec.strip()
    if reward_model_kwargs and not spec.startswith("rm:"):
        raise RewardError(f"reward spec {spec!r}: reward_model_kwargs apply only to 'rm:' specs")
    if spec.startswith(("http://", "https://")):
        return RewardSource(spec, RemoteReward(spec), weight)
    if spec.startswith("rm:"):
        path = spec[len("rm:") :]
        if not path:
            raise RewardError(f"reward spec {spec!r}: expected 'rm:<path-or-hub-name>'")
        if not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise RewardError(f"reward spec {spec!r}: {path} does not exist (a local reward model directory, or a hub name 'org/model')")
        return RewardSource(spec, RewardModel(path, **(reward_model_kwargs or {})), weight)
    for prefix, default_attr, wrap in (
        ("verl:", "compute_score", from_verl),
        ("openrlhf:", "reward_func", from_openrlhf),
    ):
        if spec.startswith(prefix):
            target, attr = _split_target(spec[len(prefix) :], default_attr, spec)
            return RewardSource(attr, wrap(_load_callable(target, attr, spec)), weight)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise RewardError(
            f"reward spec {spec!r}: expected 'module:function', 'file.py:function', 'verl:...', "
            "'openrlhf:...', 'rm:...' or an http(s) URL"
        )
    return RewardSource(attr, _load_callable(target, attr, spec), weight)


def load_reward_function(spec: str) -> RewardFn:
    """The reward function of :func:`load_reward_source` (same spec forms and errors)."""
    return load_reward_source(spec).fn
