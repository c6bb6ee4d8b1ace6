"""Built-in verifiable tasks, a character-level tokenizer and a tiny model, all made locally.

They let ``reinforcepp train`` run with no download: the tokenizer is built from a fixed
alphabet, the model from a config with random weights, the data from a seeded generator, and
the reward is exact match against the known answer (with partial credit per character, so that
the reward is informative before the first exact hit).

Tasks (``task=NAME``), each with a plausible wrong behaviour (its *distractor*):

* ``reverse``: ``"rev abcde="`` -> ``"edcba"`` (distractor: copy, ``"abcde"``)
* ``sort``: ``"sort 5183="`` -> ``"1358"`` (distractor: descending, ``"8531"``)
* ``add``: ``"27+45="`` -> ``"72"`` (distractor: no carry, ``"62"``)
* ``tools``: ``"5821+9377="`` -> call ``<t>add 5821 9377</t>``, read ``<r>15198</r>``,
  answer ``"15198"`` (distractor: answer at once, without the tool; see :mod:`reinforcepp.agents.task`)

The warm start imitates demonstrations of mixed quality: a fraction of them (``sft_wrong_fraction``)
show the distractor. The warm-started model then knows both behaviours and often prefers the
wrong one; RL with the verifiable reward has to find out which one is right. This is what RL does
to language models in practice (sharpen what the model can already do towards what is rewarded),
made small enough to watch in a few minutes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz+-*=:., "
TOOL_ALPHABET = ALPHABET + "<>/"
"""``task=tools`` also needs the tag characters of ``<t>...</t>``."""
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def build_char_tokenizer(alphabet: str = ALPHABET):
    """A character-level ``PreTrainedTokenizerFast``: one token per character of ``alphabet``
    (:data:`ALPHABET`), plus ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``. Decodes without spaces
    between tokens. Save it with ``save_pretrained`` and it loads with ``AutoTokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *alphabet])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   padding_side="left")


def build_tiny_model(tokenizer, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
                     context: int = 64):
    """A randomly initialised Llama-architecture causal LM sized for a laptop CPU
    (about 0.4M parameters at the defaults); ``context`` is its ``max_position_embeddings``
    (prompt plus response tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


CHAT_ALPHABET = ALPHABET + "\n" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "?!'\"()/_"
"""Characters of :func:`build_chat_tokenizer`: the built-in alphabet, capitals, newline, punctuation."""
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The ChatML template of Qwen2 (without its default system message): each turn is
``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n``; the generation prompt is ``<|im_start|>assistant\\n``."""


def build_chat_tokenizer(alphabet: str = CHAT_ALPHABET):
    """A character-level tokenizer with Qwen2's chat format: ``<|im_start|>`` and ``<|im_end|>``
    as single tokens, ``<|im_end|>`` as EOS (as in Qwen2's instruct models) and
    :data:`CHATML_TEMPLATE` as its chat template. Saves and loads like any tokenizer."""
    tok = build_char_tokenizer(alphabet)
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.eos_token = IM_END
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_qwen2(tokenizer, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
                     context: int = 128):
    """A randomly initialised Qwen2 causal LM (grouped-query attention, biases on q/k/v) sized
    like :func:`build_tiny_model`, for ``tokenizer`` (:func:`build_chat_tokenizer`)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


@dataclass(frozen=True)
class Task:
    """A built-in task: a seeded example generator and its reward."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str, str]]
    """rng -> (prompt, answer, distractor)"""
    max_answer_length: int
    alphabet: str = ALPHABET
    """characters of the task's char tokenizer"""
    reward: Optional[Callable[..., list[float]]] = None
    """the task's reward function (``None`` = :func:`char_match`)"""
    environment: Optional[Callable[[], Any]] = None
    """a multi-turn task's environment factory (reinforcepp.agents); ``None`` = single turn"""

    def examples(self, n: int, seed: int, wrong_fraction: float = 0.0) -> list[dict[str, str]]:
        """``n`` rows ``{prompt, answer, demonstration}``; the demonstration (what the warm start
        imitates) is the distractor with probability ``wrong_fraction``, else the answer."""
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            prompt, answer, distractor = self.make(rng)
            demo = distractor if rng.random() < wrong_fraction else answer
            rows.append({"prompt": prompt, "answer": answer, "demonstration": demo})
        return rows


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    s = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
    return f"rev {s}=", s[::-1], s


def _sort(rng: random.Random) -> tuple[str, str, str]:
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    return f"sort {s}=", "".join(sorted(s)), "".join(sorted(s, reverse=True))


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    no_carry = (a // 10 + b // 10) * 10 + (a + b) % 10  # the carry out of the units is forgotten
    return f"{a}+{b}=", str(a + b), str(no_carry)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("reverse", "reverse a string of 3-6 letters: 'rev abc=' -> 'cba'", _reverse, 6),
        Task("sort", "sort 3-6 digits: 'sort 312=' -> '123'", _sort, 6),
        Task("add", "add two numbers below 100: '27+45=' -> '72'", _add, 3),
    )
}


def _tools_task() -> Task:
    from ..agents.task import make_env, make_example

    return Task("tools", "add two 4-digit numbers with a calculator tool: "
                         "'5821+9377=' -> '<t>add 5821 9377</t>', then '15198'",
                make_example, 5, alphabet=TOOL_ALPHABET, environment=make_env)


def get_task(name: str) -> Task:
    if name == "tools" and name not in TASKS:
        TASKS[name] = _tools_task()  # built on first use: it imports reinforcepp.agents
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join([*TASKS, 'tools'])}")
    return TASKS[name]


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 when the completion (stripped) equals the answer, else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def char_match(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """Partial credit: fraction of answer positions matched, minus a length-mismatch term,
    in [0, 1]: ``sum_j [c_j == a_j] / max(len(c), len(a))``."""
    out = []
    for c, a in zip(completions, answer):
        c = c.strip()
        hits = sum(x == y for x, y in zip(c, a))
        out.append(hits / max(len(c), len(a), 1))
    return out


def write_task_files(task: Task, directory: str | Path, n_train: int, n_eval: int, seed: int,
                     wrong_fraction: float = 0.0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (``prompt``, ``answer``, ``demonstration``) for a
    task; eval examples come from a different seed stream, and prompts seen in train are removed."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train = task.examples(n_train, seed, wrong_fraction)
    seen = {r["prompt"] for r in train}
    evals = [r for r in task.examples(n_eval * 3, seed + 10_000) if r["prompt"] not in seen][:n_eval]
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, rows in zip(paths, (train, evals)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
