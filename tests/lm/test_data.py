"""Prompt datasets (reinforcepp.lm.data): loading every source form, prompt validation, chat
rendering with a locally built tokenizer, eval split, and the resumable loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from reinforcepp.lm.data import (
    PromptLoader,
    check_prompt_column,
    columns_of,
    load_prompt_dataset,
    render_prompt,
    split_eval,
)

torch.set_num_threads(1)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
ROWS = [
    {"prompt": "1+1=", "answer": "2"},
    {"prompt": "2+2=", "answer": "4"},
    {"prompt": "3+3=", "answer": "6"},
]

# A ChatML-like template: each message as <|role|>content<|end|>, then the assistant opener.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(autouse=True)
def rd_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Arrow cache of file loading inside the test's tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _tokenizer(tmp_path: Path, chat_template: str | None) -> Any:
    """A word-level tokenizer built locally, saved and loaded back with AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    if chat_template is not None:
        fast.chat_template = chat_template
    path = tmp_path / ("tok_chat" if chat_template else "tok_plain")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# --- loading ----------------------------------------------------------------------------------


def _check_rows(ds: datasets.Dataset, rows: list[dict[str, Any]]) -> None:
    assert isinstance(ds, datasets.Dataset)
    assert ds.to_list() == rows


def test_load_jsonl_json_parquet_and_disk(tmp_path: Path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    _check_rows(load_prompt_dataset(jsonl), ROWS)
    _check_rows(load_prompt_dataset(str(jsonl), split="train[:2]"), ROWS[:2])

    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps(ROWS))
    _check_rows(load_prompt_dataset(as_json), ROWS)

    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    _check_rows(load_prompt_dataset(parquet), ROWS)

    disk = tmp_path / "disk"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(disk))
    _check_rows(load_prompt_dataset(disk), ROWS)

    disk_dict = tmp_path / "disk_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(disk_dict))
    _check_rows(load_prompt_dataset(disk_dict), ROWS)
    _check_rows(load_prompt_dataset(disk_dict, split="test"), ROWS[:1])


def test_load_dataset_and_dataset_dict_objects():
    ds = datasets.Dataset.from_list(ROWS)
    assert load_prompt_dataset(ds) is ds
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([0])})
    assert load_prompt_dataset(dd) is dd["train"]
    assert len(load_prompt_dataset(dd, split="validation")) == 1
    with pytest.raises(ValueError, match=r"no split 'test'; available splits: \['train', 'validation'\]"):
        load_prompt_dataset(dd, split="test")
    with pytest.raises(ValueError, match="has no splits"):
        load_prompt_dataset(ds, split="train")


def test_chat_message_prompts_load_from_jsonl(tmp_path: Path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": CHAT, "answer": "4"}) + "\n")
    ds = load_prompt_dataset(path)
    assert ds[0]["prompt"] == CHAT


def test_missing_file_and_unknown_suffix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompt_dataset(tmp_path / "missing.jsonl")
    odd = tmp_path / "p.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"supported files are \['.csv', '.json', '.jsonl', '.parquet'\]"):
        load_prompt_dataset(odd)


def test_missing_prompt_column_lists_columns_and_nearest():
    ds = datasets.Dataset.from_list([{"prompts": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"'prompt' not in the dataset; available columns: \['prompts', 'answer'\]; "
                       r"did you mean 'prompts'\?"):
        load_prompt_dataset(ds)
    ds = datasets.Dataset.from_list([{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"available columns: \['question', 'answer'\]$"):
        load_prompt_dataset(ds)
    assert load_prompt_dataset(ds, prompt_column="question")[0] == {"question": "a", "answer": "b"}


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (7, r"row 1: column 'prompt' is a int"),
        ([], "row 1: column 'prompt' is an empty list"),
        (["hi"], "row 1: column 'prompt' message 0 is a str"),
        ([{"role": "user"}], r"row 1: column 'prompt' message 0 needs a string 'content'"),
    ],
)
def test_bad_prompt_values_name_the_row(value: Any, pattern: str):
    ds = datasets.Dataset.from_dict({"prompt": [None, None]}).cast_column("prompt", datasets.Value("string"))
    rows: list[Any] = ["fine", value]
    # Arrow cannot mix types in one column: check the validator through a plain list view
    class ListView:
        column_names = ["prompt"]

        def __len__(self) -> int:
            return 2

        def __getitem__(self, key: str) -> list[Any]:
            return rows

    with pytest.raises(ValueError, match=pattern):
        check_prompt_column(ListView(), "prompt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="row 0: column 'prompt' is a NoneType"):
        load_prompt_dataset(ds)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        load_prompt_dataset(datasets.Dataset.from_dict({"prompt": []}))


def test_split_eval_sizes_disjoint_and_seeded():
    ds = datasets.Dataset.from_dict({"prompt": [str(i) for i in range(10)]})
    assert split_eval(ds, 0.0, seed=0) == (ds, None)
    train, held = split_eval(ds, 0.25, seed=3)
    assert held is not None and len(held) == 3 and len(train) == 7  # ceil(2.5)
    assert sorted(list(train["prompt"]) + list(held["prompt"]), key=int) == [str(i) for i in range(10)]
    _, held2 = split_eval(ds, 0.25, seed=3)
    _, held3 = split_eval(ds, 0.25, seed=4)
    assert held2 is not None and list(held2["prompt"]) == list(held["prompt"])
    assert held3 is not None and list(held3["prompt"]) != list(held["prompt"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_eval(ds, 1.0, seed=0)


# --- rendering --------------------------------------------------------------------------------


def test_render_with_chat_template(tmp_path: Path):
    tok = _tokenizer(tmp_path, TEMPLATE)
    assert render_prompt(tok, CHAT) == "<|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>"
    assert render_prompt(tok, "hello") == "<|user|>hello<|end|><|assistant|>"
    assert render_prompt(tok, "hello", use_chat_template=False) == "hello"
    with pytest.raises(ValueError, match="use_chat_template=False"):
        render_prompt(tok, CHAT, use_chat_template=False)


def test_render_removes_arrow_none_keys():
    """Arrow fills keys missing from some messages with None; they must not reach the template."""
    seen: list[Any] = []

    class Recorder:
        chat_template = "recorded"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            seen.append((messages, tokenize, add_generation_prompt))
            return "ok"

    with_none = [{"role": "user", "content": "hi", "name": None}]
    assert render_prompt(Recorder(), with_none) == "ok"
    assert seen == [([{"role": "user", "content": "hi"}], False, True)]


def test_render_without_chat_template(tmp_path: Path):
    tok = _tokenizer(tmp_path, None)
    assert render_prompt(tok, "hello world") == "hello world"
    with pytest.raises(ValueError, match="has no chat_template"):
        render_prompt(tok, CHAT)
    with pytest.raises(ValueError, match="message 0 needs a string 'role'"):
        render_prompt(tok, [{"content": "x"}])


# --- loader -----------------------------------------------------------------------------------


def _ids(batch: list[dict[str, Any]]) -> list[int]:
    return [row["i"] for row in batch]


@pytest.fixture
def rd_numbers() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)], "i": list(range(10))})


def test_loader_epochs_cover_rows_and_reshuffle(rd_numbers: datasets.Dataset):
    loader = PromptLoader(rd_numbers, 3, seed=7)
    assert loader.batches_per_epoch == 3
    epoch0 = [_ids(loader.next_batch()) for _ in range(3)]
    assert loader.epoch == 1 and loader.state_dict() == {"epoch": 1, "position": 0}
    epoch1 = [_ids(next(loader)) for _ in range(3)]
    flat0, flat1 = sum(epoch0, []), sum(epoch1, [])
    assert all(len(b) == 3 for b in epoch0 + epoch1)
    assert len(set(flat0)) == 9 and len(set(flat1)) == 9  # drop_last: one row skipped per epoch
    assert flat0 != flat1  # reshuffled
    import numpy as np

    assert flat0 == np.random.default_rng([7, 0]).permutation(10)[:9].tolist()
    assert flat1 == np.random.default_rng([7, 1]).permutation(10)[:9].tolist()
    row = PromptLoader(rd_numbers, 3, seed=7).next_batch()[0]
    assert row == {"prompt": f"p{row['i']}", "i": row["i"]}


def test_loader_same_seed_same_batches_other_seed_differs(rd_numbers: datasets.Dataset):
    a = [_ids(b) for b, _ in zip(PromptLoader(rd_numbers, 4, seed=1), range(5))]
    b = [_ids(b) for b, _ in zip(PromptLoader(rd_numbers, 4, seed=1), range(5))]
    c = [_ids(b) for b, _ in zip(PromptLoader(rd_numbers, 4, seed=2), range(5))]
    assert a == b and a != c


def test_loader_resume_continues_exactly(rd_numbers: datasets.Dataset):
    loader = PromptLoader(rd_numbers, 4, seed=5)  # 2 batches per epoch
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    assert state == {"epoch": 2, "position": 4}
    expected = [loader.next_batch() for _ in range(3)]
    fresh = PromptLoader(rd_numbers, 4, seed=5)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert [fresh.next_batch() for _ in range(3)] == expected
    assert fresh.state_dict() == loader.state_dict()
    with pytest.raises(ValueError, match="invalid loader state"):
        fresh.load_state_dict({"epoch": 0, "position": 9})
    with pytest.raises(ValueError, match="expected keys"):
        fresh.load_state_dict({"epoch": 0})


def test_loader_no_shuffle_no_drop_last(rd_numbers: datasets.Dataset):
    loader = PromptLoader(rd_numbers, 4, seed=0, shuffle=False, drop_last=False)
    assert loader.batches_per_epoch == 3
    assert [_ids(loader.next_batch()) for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    assert loader.epoch == 1


def test_loader_too_small_dataset(rd_numbers: datasets.Dataset):
    with pytest.raises(ValueError, match="10 rows, fewer than one batch of 11"):
        PromptLoader(rd_numbers, 11, seed=0)
    assert len(PromptLoader(rd_numbers, 11, seed=0, drop_last=False).next_batch()) == 10


def test_columns_of():
    rows = [{"prompt": "a", "answer": "1", "level": 2}, {"prompt": "b", "answer": "3", "level": 4}]
    assert columns_of(rows) == {"answer": ["1", "3"], "level": [2, 4]}
    assert columns_of(rows, exclude=("prompt", "level")) == {"answer": ["1", "3"]}
    assert columns_of([]) == {}
    with pytest.raises(ValueError, match="row 1 has keys"):
        columns_of([{"prompt": "a", "x": 1}, {"prompt": "b"}])
