"""Prompt datasets for language-model training: loading, validation, chat rendering, and a
deterministic, resumable batch loader.

A prompt dataset is a :class:`datasets.Dataset` with a prompt column (default ``prompt``) whose
values are either a string or a list of chat messages ``[{"role": ..., "content": ...}]``; every
other column (``answer``, ``data_source``, ...) travels with the prompt to the reward functions
(:func:`columns_of`). docs/lm.md ("Datasets") documents the formats.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

import datasets

Prompt = Union[str, list[dict[str, Any]]]
"""A plain string, or chat messages ``[{"role": str, "content": str}, ...]``."""

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File suffix -> the ``datasets`` builder that reads it."""


# --- loading ----------------------------------------------------------------------------------


def _from_dict(dd: datasets.DatasetDict, split: Optional[str], what: str) -> datasets.Dataset:
    name = split or "train"
    if name not in dd:
        raise ValueError(f"{what} has no split {name!r}; available splits: {sorted(dd)}")
    return dd[name]


def check_jsonl(path: Path) -> None:
    """Every non-empty line of a ``.jsonl`` file is a JSON object, and there is one at least:
    a bad file is an :class:`~reinforcepp.errors.InputError` naming the file and line (the
    ``datasets`` reader buries the line in chained tracebacks)."""
    import json

    from ..errors import InputError

    rows = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}): "
                                 f"{line.strip()[:60]!r}") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: each line must be a JSON "
                                 f"object with a prompt, got {type(row).__name__}")
            rows += 1
    if rows == 0:
        raise InputError(f"{path}: the file holds no rows")


def _load_path(path: Path, split: Optional[str], config_name: Optional[str]) -> datasets.Dataset:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _from_dict(loaded, split, f"dataset directory {str(path)!r}")
            if split is not None:
                raise ValueError(f"{str(path)!r} holds a single Dataset (save_to_disk); it has no split {split!r}")
            return loaded
        return datasets.load_dataset(str(path), config_name, split=split or "train")  # a folder of data files
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if path.suffix.lower() == ".jsonl":
        check_jsonl(path)
    if builder is None:
        raise ValueError(
            f"cannot read {str(path)!r}: supported files are {sorted(FILE_BUILDERS)}, or a directory "
            "written by Dataset.save_to_disk"
        )
    if path.suffix.lower() in (".csv", ".json"):
        check_utf8(path)
    return datasets.load_dataset(builder, data_files=str(path), split=split or "train")


def check_utf8(path: Path) -> None:
    """A text data file is UTF-8: otherwise an :class:`~reinforcepp.errors.InputError` naming the
    file, line and byte (the readers of ``datasets`` fail deep inside pandas or pyarrow)."""
    import codecs

    from ..errors import InputError

    decoder = codecs.getincrementaldecoder("utf-8")()
    newline = b"\n"
    line = 1
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                before = block[: max(0, e.start)]
                column = len(before) - before.rfind(newline)
                at = line + before.count(newline)
                raise InputError(f"{path}:{at}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at column {column}); "
                                 "save the file as UTF-8") from None
            line += block.count(newline)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text (the file ends inside a character); "
                             "save the file as UTF-8") from None


def load_prompt_dataset(
    source: Union[str, Path, datasets.Dataset, datasets.DatasetDict],
    *,
    split: Optional[str] = None,
    prompt_column: Optional[str] = "prompt",
    config_name: Optional[str] = None,
) -> datasets.Dataset:
    """Load a prompt dataset and validate its prompt column (``None``: no check, the caller
    checks the columns it reads).

    Args:
        source: a ``Dataset``; a ``DatasetDict`` (its ``split``, default ``"train"``); a path to a
            ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file (``split`` defaults to
            ``"train"``, slicing like ``"train[:100]"`` works); a directory written by
            ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` and its ``split``); or a
            Hugging Face hub dataset name (``datasets.load_dataset(name, config_name,
            split=split or "train")``).
        split: the split to take; must be ``None`` for a ``Dataset`` (it has no splits).
        prompt_column: the column holding the prompts; nothing is renamed.
        config_name: the hub dataset's configuration (``"main"`` for ``openai/gsm8k``).

    Raises:
        FileNotFoundError: ``source`` looks like a file path that does not exist.
        ValueError: missing split; ``prompt_column`` missing (the available columns and the
            nearest one are named); a prompt that is neither a string nor chat messages (its row
            index is named); an empty dataset.
    """
    if isinstance(source, datasets.DatasetDict):
        dataset = _from_dict(source, split, "the DatasetDict")
    elif isinstance(source, datasets.Dataset):
        if split is not None:
            raise ValueError(f"split={split!r} given with a Dataset, which has no splits")
        dataset = source
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.exists():
            dataset = _load_path(path, split, config_name)
        elif path.suffix.lower() in FILE_BUILDERS or str(source).startswith((".", "/", "~")):
            raise FileNotFoundError(f"dataset file {str(source)!r} not found (cwd {Path.cwd()})")
        else:
            dataset = datasets.load_dataset(str(source), config_name, split=split or "train")
    else:
        raise TypeError(f"source must be a Dataset, DatasetDict, path or hub name, got {type(source).__name__}")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    if prompt_column is not None:
        check_prompt_column(dataset, prompt_column)
    return dataset


def check_prompt_column(dataset: datasets.Dataset, prompt_column: str = "prompt") -> None:
    """Check that ``prompt_column`` exists and every value is a :data:`Prompt`.

    Raises:
        ValueError: naming the available columns and the nearest one, or the first bad row.
    """
    columns = list(dataset.column_names)
    if prompt_column not in columns:
        near = difflib.get_close_matches(prompt_column, columns, n=1, cutoff=0.5)
        lower = [c for c in columns if c.lower() == prompt_column.lower()]
        hint = lower[0] if lower else (near[0] if near else None)
        chat = [c for c in columns
                if len(dataset) and isinstance(dataset[0][c], list) and _prompt_problem(dataset[0][c]) is None]
        if hint is None and chat:  # TRL's conversational data: a `messages` column
            hint = chat[0]
            said = (f"; column {hint!r} holds chat messages: set prompt_column={hint!r} if they end before the answer "
                    "(whole conversations with the answer are warm-start data: `reinforcepp sft data=...`)")
        else:
            said = f"; did you mean {hint!r}? (set prompt_column={hint!r})" if hint else ""
        raise ValueError(f"prompt column {prompt_column!r} not in the dataset; available columns: {columns}" + said)
    if len(dataset) == 0:
        raise ValueError("the prompt dataset is empty")
    for i, value in enumerate(dataset[prompt_column]):
        problem = _prompt_problem(value)
        if problem is not None:
            raise ValueError(f"row {i}: column {prompt_column!r} {problem}")


def _prompt_problem(value: Any) -> Optional[str]:
    """Why ``value`` is not a :data:`Prompt`, or ``None``."""
    if isinstance(value, str):
        return None
    if isinstance(value, list):
        if not value:
            return "is an empty list of chat messages"
        for j, message in enumerate(value):
            if not isinstance(message, dict):
                return f"message {j} is a {type(message).__name__}, not a dict with 'role' and 'content'"
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    return f"message {j} needs a string {key!r}, got {message.get(key)!r:.60}"
        return None
    return f"is a {type(value).__name__} ({value!r:.60}); expected a string or a list of chat messages"


def split_eval(
    dataset: datasets.Dataset, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """Hold out ``eval_fraction`` of the rows (``ceil(fraction * n)``, shuffled with ``seed``).

    Returns:
        ``(train, eval)``; ``(dataset, None)`` when ``eval_fraction == 0``.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return dataset, None
    n_eval = int(np.ceil(eval_fraction * len(dataset)))
    if n_eval >= len(dataset):
        raise ValueError(f"eval_fraction={eval_fraction} of {len(dataset)} rows leaves no training rows")
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# --- rendering --------------------------------------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, prompt: Prompt, use_chat_template: bool = True) -> str:
    """The prompt text the policy continues.

    - chat messages -> ``tokenizer.apply_chat_template(messages, tokenize=False,
      add_generation_prompt=True)`` (message keys whose value is ``None``, which Arrow adds when
      rows differ in keys, are removed first);
    - a string, with ``use_chat_template`` and a tokenizer that has a chat template -> wrapped
      as ``[{"role": "user", "content": prompt}]`` and templated the same way;
    - otherwise the string unchanged.

    The rendered text usually holds the template's special tokens (a BOS among them):
    tokenise it with ``add_special_tokens=False``.

    Raises:
        ValueError: chat messages with ``use_chat_template=False`` or a tokenizer without a chat
            template.
    """
    if isinstance(prompt, str):
        if use_chat_template and has_chat_template(tokenizer):
            return _apply_template(tokenizer, [{"role": "user", "content": prompt}])
        return prompt
    problem = _prompt_problem(prompt)
    if problem is not None:
        raise ValueError(f"prompt {problem}")
    if not use_chat_template:
        raise ValueError("the prompt is a list of chat messages but use_chat_template=False")
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"the prompt is a list of chat messages but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
            "has no chat_template; set tokenizer.chat_template or use string prompts"
        )
    messages = [{k: v for k, v in m.items() if v is not None} for m in prompt]
    return _apply_template(tokenizer, messages)


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def check_prompt_lengths(
    prompts: Sequence[Prompt],
    render: Any,
    tokenizer: Any,
    *,
    limit: Optional[int],
    truncate: bool,
    where: str,
    batch_size: int = 1024,
) -> None:
    """Every prompt of a dataset checked once, before the first step: rendered (``render``), its
    token count from one batched tokenizer call per ``batch_size`` rows. A prompt that is empty
    (or only whitespace, or renders to no token) or, unless ``truncate``, longer than ``limit``
    tokens is an :class:`~reinforcepp.errors.InputError` naming ``where`` (the data), the row
    and the counts: found at start instead of at the step that first draws it.

    Args:
        prompts: the dataset's prompt column (strings or chat messages).
        render: prompt -> the text the policy continues (:func:`render_prompt`).
        tokenizer: the policy's tokenizer (called on a list of texts, ``add_special_tokens=False``).
        limit: the most tokens a prompt may have (:func:`~.models.prompt_limit`); None: any.
        truncate: ``truncate_prompts``: a longer prompt is cut when drawn, not refused.
        where: the data's name in messages (``train_data=prompts.jsonl``).
    """
    from ..errors import InputError

    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        texts = [render(p) for p in chunk]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for j, (prompt, text, n) in enumerate(zip(chunk, texts, lengths)):
            if n == 0 or (isinstance(prompt, str) and not prompt.strip()):
                raise InputError(f"{where} row {start + j}: the prompt is empty ({prompt!r}, {n} tokens); "
                                 "every prompt needs text for the policy to continue")
            if limit is not None and n > limit and not truncate:
                raise InputError(f"{where} row {start + j}: a prompt has {n} tokens > {limit} allowed "
                                 "(max_prompt_length, or the model's context minus max_new_tokens); shorten it or set "
                                 f"truncate_prompts=true: {text[:60]!r}")


# --- batching ---------------------------------------------------------------------------------


class PromptLoader:
    """An endless stream of prompt batches, epoch after epoch, deterministic and resumable.

    Epoch ``e`` visits the rows in the order ``numpy.random.default_rng([seed, e]).permutation(n)``
    (or ``0..n-1`` without ``shuffle``) and yields ``batch_size`` rows at a time; with
    ``drop_last`` the last ``n % batch_size`` rows of each epoch are skipped, otherwise the last
    batch of the epoch is smaller. Each row is a dict of all columns.

    ``state_dict()`` is ``{"epoch", "position"}`` (the epoch of the next batch and its first
    position in that epoch's order); a fresh loader over the same dataset, batch size and seed
    with ``load_state_dict`` yields exactly the batches the original would have yielded next.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        n = len(dataset)
        if n == 0:
            raise ValueError("the dataset is empty")
        if drop_last and n < batch_size:
            raise ValueError(
                f"the dataset has {n} rows, fewer than one batch of {batch_size} (drop_last=True)"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._epoch = 0
        self._position = 0
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    @property
    def epoch(self) -> int:
        """Number of epochs completed: the epoch the next batch comes from."""
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _epoch_end(self) -> int:
        n = len(self.dataset)
        return n - n % self.batch_size if self.drop_last else n

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of ``epoch`` in visiting order."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next_batch(self) -> list[dict[str, Any]]:
        """The next ``batch_size`` rows (fewer only at an epoch's end without ``drop_last``)."""
        if self._order_epoch != self._epoch:
            self._order = self.order(self._epoch)
            self._order_epoch = self._epoch
        assert self._order is not None
        end = min(self._position + self.batch_size, self._epoch_end())
        indices = self._order[self._position : end].tolist()
        self._position = end
        if self._position >= self._epoch_end():
            self._epoch += 1
            self._position = 0
        columns = self.dataset[indices]
        return [{k: columns[k][j] for k in columns} for j in range(len(indices))]

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != {"epoch", "position"}:
            raise ValueError(f"expected keys {{'epoch', 'position'}}, got {sorted(state)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self._epoch_end() or position % self.batch_size:
            raise ValueError(
                f"invalid loader state {state} for {len(self.dataset)} rows in batches of {self.batch_size}"
            )
        self._epoch, self._position = epoch, position


def columns_of(rows: Sequence[dict[str, Any]], exclude: Sequence[str] = ("prompt",)) -> dict[str, list]:
    """Transpose rows into column lists for the reward functions: ``[{"prompt": p, "answer": a},
    ...] -> {"answer": [a, ...]}`` (columns in ``exclude`` left out).

    Raises:
        ValueError: rows with different keys.
    """
    if not rows:
        return {}
    keys = [k for k in rows[0] if k not in exclude]
    expected = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != expected:
            raise ValueError(f"row {i} has keys {sorted(row)}, row 0 has {sorted(expected)}")
    return {k: [row[k] for row in rows] for k in keys}
