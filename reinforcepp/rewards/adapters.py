"""Adapters that run other frameworks' reward functions unchanged: verl's per-sample
``compute_score`` and OpenRLHF's batched ``reward_func``, each as a TRL-convention function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import RewardConfigError, RewardError, RewardFn, function_name, short_name


class _VerlAdapter:
    """verl's per-sample ``compute_score`` as a TRL-convention reward function."""

    text_only = True

    def __init__(
        self, compute_score: Callable[..., Any], data_source_column: str, ground_truth_column: str,
        extra_info_column: str,
    ) -> None:
        self.compute_score = compute_score
        self.data_source_column = data_source_column
        self.ground_truth_column = ground_truth_column
        self.extra_info_column = extra_info_column
        self.__name__ = short_name(compute_score, "compute_score")
        self.display_name = f"from_verl({function_name(compute_score)})"

    def check_columns(self, columns: list[str], where: str) -> None:
        """At start: a ground-truth column exists (the ``reward_model`` column is checked for
        its ``ground_truth`` key on the first batch)."""
        if not {self.ground_truth_column, "reward_model", "answer"} & set(columns):
            raise RewardConfigError(
                f"{where} needs argument 'ground_truth', read from column {self.ground_truth_column!r} "
                f"(or 'reward_model', or 'answer'), none of which the dataset has "
                f"(columns: {', '.join(sorted(columns))})"
            )

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
            f"verl reward {function_name(self.compute_score)} needs a ground truth: the batch has no column "
            f"{self.ground_truth_column!r} (nor 'reward_model' with 'ground_truth', nor 'answer'); "
            f"columns: {sorted(columns)}"
        )

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> Any:
        n = len(completions)
        ground_truths = self._ground_truths(n, columns)
        data_sources = columns.get(self.data_source_column, [""] * n)
        extra_infos = columns.get(self.extra_info_column, [None] * n)
        values: list[Any] = []
        extras: dict[str, list[Any]] = {}
        failed: list[int] = []
        first: BaseException | None = None
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
                    for key, value in out.items():  # verl logs the other keys (say "acc") too
                        if key != "score" and isinstance(value, (bool, int, float)):
                            extras.setdefault(key, []).append(float(value))
                    out = out["score"]
            except Exception as exc:  # noqa: BLE001 - user code may raise anything; reported by index
                values.append(None)
                failed.append(i)
                first = first or exc
                continue
            values.append(float(out) if isinstance(out, bool) else out)
        if failed:
            raise RewardError(
                f"verl compute_score {function_name(self.compute_score)} failed on sample {failed[0]}: {first!r}",
                indices=failed,
                values=values,
            ) from first
        if extras:
            return {"rewards": values, "extra_logs": extras}
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
    same, unchanged (keyword arguments, as verl's reward managers pass them). The other numeric
    keys of a dict (say ``"acc"``) are logged as ``reward/<source>/<key>``, as verl logs them.

    Columns: ``data_source`` (missing: ``""``), ``ground_truth`` (missing: ``reward_model[i]
    ["ground_truth"]`` as in verl's parquet files, else ``answer``, else :class:`RewardError`),
    ``extra_info`` (missing: ``None``). A sample that raises is reported by index
    (:class:`RewardError` with ``indices``, chained from the first exception).
    """
    return _VerlAdapter(compute_score, data_source_column, ground_truth_column, extra_info_column)


class _OpenRLHFAdapter:
    """OpenRLHF's batched ``reward_func(queries, prompts, labels)`` as a TRL-convention function."""

    text_only = True

    def __init__(self, reward_func: Callable[..., Any], label_column: str) -> None:
        self.reward_func = reward_func
        self.label_column = label_column
        self.__name__ = short_name(reward_func, "reward_func")
        self.display_name = f"from_openrlhf({function_name(reward_func)})"

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> Any:
        n = len(completions)
        queries = [p + c for p, c in zip(prompts, completions)]
        if self.label_column in columns:
            labels = list(columns[self.label_column])
        elif "labels" in columns:  # OpenRLHF's own request field (`reinforcepp serve reward` passes it on)
            labels = list(columns["labels"])
        elif "answer" in columns:
            labels = list(columns["answer"])
        else:
            labels = [None] * n
        out = self.reward_func(queries, list(prompts), labels)
        if isinstance(out, dict):
            if "rewards" not in out:
                raise RewardError(
                    f"OpenRLHF reward_func {function_name(self.reward_func)} returned a dict without "
                    f"'rewards' (keys {sorted(out)})"
                )
            extra = out.get("extra_logs")
            return {"rewards": out["rewards"], "extra_logs": extra if isinstance(extra, dict) else {}}
        return out


def from_openrlhf(reward_func: Callable[..., Any], label_column: str = "label") -> RewardFn:
    """Wrap an OpenRLHF custom reward function as a TRL-convention :data:`RewardFn`.

    OpenRLHF calls ``reward_func(queries, prompts, labels)`` on a batch, with ``queries[i] =
    prompts[i] + completions[i]``; it returns a tensor / list of rewards or a dict whose
    ``"rewards"`` holds them (``"extra_logs"``, a dict of per-sample values, is logged as
    ``reward/<source>/<key>``; ``"scores"`` is ignored here). ``labels`` come from the ``label``
    column, else ``labels`` (OpenRLHF's own request field), else ``answer``, else a list of ``None``.
    """
    return _OpenRLHFAdapter(reward_func, label_column)
