"""Reward sources (reinforcepp.rewards): spec loading, the TRL calling convention, weights,
verl / OpenRLHF adapters, a reward model, a remote reward server, and every error path."""

from __future__ import annotations

import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.rewards import (
    RemoteReward,
    RewardConfigError,
    RewardError,
    RewardModel,
    RewardResult,
    RewardScorer,
    RewardSource,
    from_openrlhf,
    from_verl,
    load_reward_function,
    load_reward_source,
)

torch.set_num_threads(1)

EXACT = dict(atol=1e-6, rtol=0)
PROMPTS = ["1+1=", "2+2=", "3+3="]
COMPLETIONS = ["2", "5", "6!"]
ANSWERS = ["2", "4", "6"]


def exact_match(prompts: list[str], completions: list[str], answer: list[str]) -> list[float]:
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def length(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c)) for c in completions]


def score(scorer: RewardScorer, columns: dict[str, list] | None = None) -> RewardResult:
    return scorer(PROMPTS, COMPLETIONS, {"answer": ANSWERS} if columns is None else columns)


# --- weights, per-source values, column passing -----------------------------------------------


def test_weighted_sum_and_per_source_hand_computed():
    scorer = RewardScorer([RewardSource("acc", exact_match, 2.0), RewardSource("len", length, -0.5)])
    result = score(scorer)
    # acc = [1, 0, 0]; len = [1, 1, 2]; rewards = 2*acc - 0.5*len
    assert_close(result.per_source["acc"], torch.tensor([1.0, 0.0, 0.0]), **EXACT)
    assert_close(result.per_source["len"], torch.tensor([1.0, 1.0, 2.0]), **EXACT)
    assert_close(result.rewards, torch.tensor([1.5, -0.5, -1.0]), **EXACT)
    assert result.rewards.dtype == torch.float32 and result.rewards.shape == (3,)
    assert result.dropped.tolist() == [False, False, False] and result.num_dropped == 0


def test_columns_passed_by_name_only_when_accepted():
    seen: dict[str, Any] = {}

    def named(completions, answer, level=None):  # no prompts, no **kwargs
        seen["named"] = (completions, answer, level)
        return [0.0] * len(completions)

    def var_kw(prompts, completions, **kwargs):
        seen["var_kw"] = (prompts, kwargs)
        return [0.0] * len(completions)

    scorer = RewardScorer([RewardSource("a", named), RewardSource("b", var_kw)])
    scorer(PROMPTS, COMPLETIONS, {"answer": ANSWERS, "level": [1, 2, 3], "other": ["x", "y", "z"]})
    assert seen["named"] == (COMPLETIONS, ANSWERS, [1, 2, 3])  # 'other' not passed
    assert seen["var_kw"] == (PROMPTS, {"answer": ANSWERS, "level": [1, 2, 3], "other": ["x", "y", "z"]})


def test_missing_required_column_raises_even_in_drop_mode():
    scorer = RewardScorer([RewardSource("acc", exact_match)], on_error="drop")
    with pytest.raises(RewardConfigError, match=r"exact_match.*\['answer'\].*columns \['label'\]"):
        scorer(PROMPTS, COMPLETIONS, {"label": ANSWERS})


def test_positional_only_parameters_are_refused():
    def positional(prompts, completions, /):
        return [0.0] * len(completions)

    with pytest.raises(RewardConfigError, match=r"'pos'.*positional-only parameter 'prompts'"):
        RewardScorer([RewardSource("pos", positional)], on_error="drop")(PROMPTS, COMPLETIONS, {})


def test_column_named_like_an_argument_or_misaligned_is_refused():
    scorer = RewardScorer([RewardSource("len", length)], on_error="drop")
    with pytest.raises(RewardConfigError, match="may not be named 'completions'"):
        scorer(PROMPTS, COMPLETIONS, {"completions": ANSWERS})
    with pytest.raises(RewardConfigError, match="column 'answer' has 2 values for 3"):
        scorer(PROMPTS, COMPLETIONS, {"answer": ANSWERS[:2]})
    with pytest.raises(RewardConfigError, match="got 2 prompts for 3 completions"):
        scorer(PROMPTS[:2], COMPLETIONS, {})


def test_duplicate_names_get_suffixes():
    scorer = RewardScorer(
        [RewardSource("len", length), RewardSource("len", length, 2.0), RewardSource("len_2", length)]
    )
    assert scorer.names == ["len", "len_3", "len_2"]
    scorer2 = RewardScorer([RewardSource("r", length)] * 3)
    assert scorer2.names == ["r", "r_2", "r_3"]
    result = scorer2(PROMPTS, COMPLETIONS, {})
    assert_close(result.rewards, torch.tensor([3.0, 3.0, 6.0]), **EXACT)


def test_tensor_and_numpy_and_bool_outputs_accepted():
    import numpy as np

    fns = [
        lambda completions: torch.tensor([1.0, 2.0, 3.0]),
        lambda completions: np.array([1, 2, 3]),
        lambda completions: [True, False, np.float32(0.5)],
    ]
    scorer = RewardScorer([RewardSource(f"f{i}", f) for i, f in enumerate(fns)])
    result = scorer(PROMPTS, COMPLETIONS, {})
    assert_close(result.rewards, torch.tensor([3.0, 4.0, 6.5]), **EXACT)


# --- error paths ------------------------------------------------------------------------------


def fails_on_five(completions: list[str]) -> list[float]:
    return [1.0 / (c != "5") for c in completions]  # ZeroDivisionError on "5"


def test_exception_names_function_and_sample_and_chains():
    scorer = RewardScorer([RewardSource("picky", fails_on_five)])
    with pytest.raises(RewardError, match=r"'picky' \(.*fails_on_five\) failed on sample 1") as info:
        score(scorer)
    assert info.value.indices == (1,)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_exception_only_on_whole_batch_is_reported_as_such():
    def batch_only(completions):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [1.0]

    with pytest.raises(RewardError, match="failed on the batch of 3 samples but on no single sample") as info:
        score(RewardScorer([RewardSource("b", batch_only)]))
    assert isinstance(info.value.__cause__, RuntimeError)
    # drop mode keeps the per-sample values: nothing is dropped
    result = score(RewardScorer([RewardSource("b", batch_only)], on_error="drop"))
    assert result.num_dropped == 0 and result.rewards.tolist() == [1.0, 1.0, 1.0]


def test_wrong_length_names_source_expected_and_got():
    scorer = RewardScorer([RewardSource("short", lambda completions: [1.0, 2.0])])
    with pytest.raises(RewardError, match=r"'short'.*returned 2 values; expected a list of 3"):
        score(scorer)
    scorer = RewardScorer([RewardSource("scalar", lambda completions: 1.0)])
    with pytest.raises(RewardError, match=r"'scalar'.*returned a float; expected a list of 3"):
        score(scorer)


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [(1e39, r"sample 1: 1e\+39, beyond the float32 range"), (math.nan, r"sample 1: NaN"), (math.inf, r"sample 1: inf"),
     ("x", "sample 1: a str")],
)
def test_invalid_values_name_source_and_index(bad: Any, pattern: str):
    scorer = RewardScorer([RewardSource("bad", lambda completions: [1.0, bad, 2.0])])
    with pytest.raises(RewardError, match=r"'bad'.*invalid rewards at " + pattern) as info:
        score(scorer)
    assert info.value.indices == (1,)


def test_drop_mode_marks_counts_and_zeroes(caplog: pytest.LogCaptureFixture):
    sources = [
        RewardSource("picky", fails_on_five),  # fails on sample 1
        RewardSource("nan", lambda completions: [math.nan, 1.0, 1.0]),  # bad sample 0
        RewardSource("len", length, 10.0),
    ]
    scorer = RewardScorer(sources, on_error="drop")
    with caplog.at_level(logging.WARNING, logger="reinforcepp.rewards.scoring"):
        result = score(scorer)
    assert result.dropped.tolist() == [True, True, False]
    assert result.dropped_per_source == {"picky": 1, "nan": 1}
    assert result.num_dropped == 2
    # sample 2: picky 1/(True) = 1, nan 1, len 10*2 -> 22; dropped samples are exactly 0
    assert_close(result.rewards, torch.tensor([0.0, 0.0, 22.0]), **EXACT)
    assert_close(result.per_source["picky"], torch.tensor([1.0, 0.0, 1.0]), **EXACT)
    assert_close(result.per_source["nan"], torch.tensor([0.0, 1.0, 1.0]), **EXACT)
    assert "dropped 1 of 3 samples" in caplog.text and "fails_on_five" in caplog.text
    score(scorer)
    assert scorer.dropped_counts == {"picky": 2, "nan": 2, "len": 0}


def test_drop_mode_wrong_length_falls_back_to_per_sample_calls():
    calls: list[int] = []

    def drops_long(completions):  # silently omits completions longer than 1 char
        calls.append(len(completions))
        return [1.0 for c in completions if len(c) == 1]

    result = score(RewardScorer([RewardSource("d", drops_long)], on_error="drop"))
    assert calls == [3, 1, 1, 1]
    assert result.dropped.tolist() == [False, False, True]
    assert result.rewards.tolist() == [1.0, 1.0, 0.0]


# --- spec loading -----------------------------------------------------------------------------


REWARD_MODULE = '''
def accuracy(prompts, completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]

NOT_CALLABLE = 3
'''


@pytest.fixture
def rd_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "rd_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg / "scores.py"


def test_load_module_function(rd_module: Path):
    source = load_reward_source("rd_pkg.scores:accuracy", weight=0.5)
    assert source.name == "accuracy" and source.weight == 0.5
    result = RewardScorer([source])(["p", "p"], ["a", "b"], {"answer": ["a", "a"]})
    assert result.rewards.tolist() == [0.5, 0.0]


def test_load_file_function(tmp_path: Path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_MODULE)
    fn = load_reward_function(f"{path}:accuracy")
    assert fn(prompts=["p"], completions=["a"], answer=["a"]) == [1.0]
    assert load_reward_source(f"{path}:accuracy").name == "accuracy"


def test_load_errors(tmp_path: Path, rd_module: Path):
    with pytest.raises(RewardError, match=r"file '.*nope\.py' not found"):
        load_reward_source(f"{tmp_path}/nope.py:f")
    with pytest.raises(RewardError, match=r"module 'rd_pkg\.missing' is not importable"):
        load_reward_source("rd_pkg.missing:f")
    with pytest.raises(RewardError, match=r"'rd_pkg\.scores:acuracy'.*no attribute 'acuracy'; did you mean 'accuracy'"):
        load_reward_source("rd_pkg.scores:acuracy")
    with pytest.raises(RewardError, match="NOT_CALLABLE is a int, not callable"):
        load_reward_source("rd_pkg.scores:NOT_CALLABLE")
    with pytest.raises(RewardError, match="expected 'module:function'"):
        load_reward_source("rd_pkg.scores")
    with pytest.raises(RewardError, match="reward_model_kwargs apply only to 'rm:' specs"):
        load_reward_source("rd_pkg.scores:accuracy", reward_model_kwargs={"device": "cpu"})
    broken = tmp_path / "broken.py"
    broken.write_text("import rd_not_a_module_xyz\n")
    with pytest.raises(RewardError, match=r"executing .*broken\.py.*rd_not_a_module_xyz") as info:
        load_reward_source(f"{broken}:f")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


# verl's native signature, as in verl/utils/reward_score/*.py
VERL_FILE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "boom":
        raise ValueError("cannot parse")
    bonus = extra_info["bonus"] if extra_info else 0.0
    if data_source == "dict":
        return {"score": float(solution_str == ground_truth) + bonus, "acc": True}
    return (solution_str == ground_truth) + bonus
'''


def test_verl_spec_and_adapter(tmp_path: Path):
    path = tmp_path / "verl_reward.py"
    path.write_text(VERL_FILE)
    for spec in (f"verl:{path}:compute_score", f"verl:{path}"):
        source = load_reward_source(spec)
        assert source.name == "compute_score"
    scorer = RewardScorer([source])
    columns = {
        "ground_truth": ["2", "4", "6!"],
        "data_source": ["gsm8k", "dict", "gsm8k"],
        "extra_info": [None, {"bonus": 0.25}, {"bonus": 1.0}],
    }
    result = scorer(PROMPTS, COMPLETIONS, columns)
    # sample 0: True + 0 = 1; sample 1: dict score 0 + 0.25; sample 2: True + 1.0 = 2
    assert_close(result.rewards, torch.tensor([1.0, 0.25, 2.0]), **EXACT)
    # missing data_source / extra_info default to "" / None; 'answer' stands in for ground_truth
    result = scorer(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert result.rewards.tolist() == [1.0, 0.0, 0.0]
    # verl's parquet layout: reward_model = {"style": "rule", "ground_truth": ...}
    rm_col = [{"style": "rule", "ground_truth": a} for a in ["2", "5", "x"]]
    assert scorer(PROMPTS, COMPLETIONS, {"reward_model": rm_col}).rewards.tolist() == [1.0, 1.0, 0.0]


def test_verl_errors_report_index_directly():
    calls: list[str] = []

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        calls.append(solution_str)
        if solution_str == "boom":
            raise ValueError("cannot parse")
        return 1.0

    scorer = RewardScorer([RewardSource("v", from_verl(compute_score))])
    completions = ["a", "boom", "c", "boom"]
    message = r"'v'.*compute_score.*failed on sample 1 \(failing samples: \[1, 3\]\)"
    with pytest.raises(RewardError, match=message) as info:
        scorer(["p"] * 4, completions, {"answer": ["a"] * 4})
    assert isinstance(info.value.__cause__.__cause__, ValueError)
    with pytest.raises(RewardConfigError, match=r"needs a ground truth.*columns: \[.label.\]"):
        scorer(["p"] * 4, completions, {"label": ["a"] * 4})
    calls.clear()
    drop = RewardScorer([RewardSource("v", from_verl(compute_score))], on_error="drop")
    result = drop(["p"] * 4, completions, {"answer": ["a"] * 4})
    assert result.dropped.tolist() == [False, True, False, True]
    assert result.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert calls == completions  # partial results reused: no per-sample second pass


# OpenRLHF's native signature (examples/scripts/reward_func.py): queries = prompt + response
OPENRLHF_FILE = '''
import torch

def reward_func(queries, prompts, labels):
    rewards = torch.tensor([float(q[len(p):] == l) for q, p, l in zip(queries, prompts, labels)])
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"n": torch.tensor(len(queries))}}

def reward_list(queries, prompts, labels):
    return [len(q) + (0.5 if l is None else 0.0) for q in queries for l in [labels[0]]]
'''


def test_openrlhf_spec_and_adapter(tmp_path: Path):
    path = tmp_path / "orlhf.py"
    path.write_text(OPENRLHF_FILE)
    source = load_reward_source(f"openrlhf:{path}")
    assert source.name == "reward_func"
    scorer = RewardScorer([source])
    assert scorer(PROMPTS, COMPLETIONS, {"label": ["2", "5", "x"]}).rewards.tolist() == [1.0, 1.0, 0.0]
    assert scorer(PROMPTS, COMPLETIONS, {"answer": ANSWERS}).rewards.tolist() == [1.0, 0.0, 0.0]
    # no label column: labels = [None, ...]; queries are prompt + completion
    fn = load_reward_function(f"openrlhf:{path}:reward_list")
    assert fn(PROMPTS, COMPLETIONS) == [5.5, 5.5, 6.5]


def test_openrlhf_dict_without_rewards_is_an_error():
    fn = from_openrlhf(lambda queries, prompts, labels: {"scores": [1.0]})
    with pytest.raises(RewardError, match=r"'o'.*without 'rewards'"):
        RewardScorer([RewardSource("o", fn)])(["p"], ["c"], {})


# --- reward model -----------------------------------------------------------------------------


def _word_tokenizer(words: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture
def rd_reward_model_dir(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = _word_tokenizer("a b c d e the cat sat on mat".split())
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer), num_labels=1)
    model = GPT2ForSequenceClassification(config)  # no pad_token_id: RewardModel must set it
    path = tmp_path / "rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # no pad token: RewardModel must use eos
    return path


def test_reward_model_matches_manual_forward(rd_reward_model_dir: Path):
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    rm = RewardModel(str(rd_reward_model_dir), batch_size=2)
    prompts = ["the cat ", "a b ", "c "]
    completions = ["sat on the mat", "c", "d e a b c d"]
    scores = rm(prompts, completions, answer=["x"] * 3)  # padded batches of 2 and 1
    tokenizer = AutoTokenizer.from_pretrained(rd_reward_model_dir)
    model = GPT2ForSequenceClassification.from_pretrained(rd_reward_model_dir).eval()
    manual = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = tokenizer(p + c, return_tensors="pt")["input_ids"]  # one text, no padding
            manual.append(model(input_ids=ids).logits[0, 0].item())
    assert_close(torch.tensor(scores), torch.tensor(manual), atol=1e-5, rtol=0)
    assert len(set(round(s, 4) for s in scores)) == 3  # the texts score differently

    source = load_reward_source(f"rm:{rd_reward_model_dir}", reward_model_kwargs={"batch_size": 1})
    assert source.name == f"rm:{rd_reward_model_dir}" and source.fn.batch_size == 1
    assert_close(RewardScorer([source])(prompts, completions, {}).rewards, torch.tensor(manual), atol=1e-5, rtol=0)


def test_reward_model_refuses_multi_label_head(tmp_path: Path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = _word_tokenizer(["a"])
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=len(tokenizer), num_labels=2)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(RewardError, match="num_labels=2"):
        RewardModel(str(tmp_path))


# --- remote reward ----------------------------------------------------------------------------


class _Server:
    """A real HTTP reward server on 127.0.0.1 in a thread; ``mode`` picks the response."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.mode = "dict"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                rewards = [len(c) + float(a == c) for c, a in zip(body["completions"], body.get("answer", []))]
                if outer.mode == "error":
                    self._send(500, b"reward server exploded")
                    return
                payload = {"rewards": rewards, "scores": rewards} if outer.mode == "dict" else rewards
                self._send(200, json.dumps(payload).encode())

            def _send(self, code: int, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/reward"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)


@pytest.fixture
def rd_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = _Server()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=5)
        assert not server.thread.is_alive()


def test_remote_reward_protocol_and_both_response_shapes(rd_server: _Server):
    source = load_reward_source(rd_server.url)
    assert source.name == rd_server.url
    scorer = RewardScorer([source])
    expected = [1 + 1.0, 1 + 0.0, 2 + 0.0]
    assert score(scorer).rewards.tolist() == expected
    body = rd_server.requests[0]
    assert body == {
        "prompts": PROMPTS,
        "completions": COMPLETIONS,
        "query": [p + c for p, c in zip(PROMPTS, COMPLETIONS)],
        "labels": ANSWERS,  # OpenRLHF's ground truth, filled from the answer column
        "answer": ANSWERS,
    }
    rd_server.mode = "list"
    chunked = RemoteReward(rd_server.url, timeout=5, batch_size=2)
    assert chunked(PROMPTS, COMPLETIONS, answer=ANSWERS) == expected
    chunks = [r["completions"] for r in rd_server.requests[1:]]  # sent concurrently: any order
    assert sorted(chunks) == sorted([COMPLETIONS[:2], COMPLETIONS[2:]])


def test_remote_reward_http_error_names_url_and_status(rd_server: _Server):
    rd_server.mode = "error"
    scorer = RewardScorer([RewardSource("remote", RemoteReward(rd_server.url, timeout=5))])
    with pytest.raises(RewardError, match=r"HTTP 500.*reward server exploded") as info:
        score(scorer)
    assert rd_server.url in str(info.value.__cause__)
    assert len(rd_server.requests) == 1  # no per-sample retries against a server
    drop = RewardScorer([RewardSource("remote", RemoteReward(rd_server.url, timeout=5))], on_error="drop")
    result = score(drop)
    assert result.dropped.all() and result.dropped_per_source == {"remote": 3}
    assert len(rd_server.requests) == 2


def test_remote_reward_unreachable():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fn = RemoteReward(f"http://127.0.0.1:{port}/", timeout=2)
    with pytest.raises(RewardError, match=f"127.0.0.1:{port}/ could not be reached"):
        fn(["p"], ["c"])
