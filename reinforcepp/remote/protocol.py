"""What the client and the servers agree on: paths, payloads, the tokenizer fingerprint.

docs/remote.md writes the same protocol out for people who write their own server.

Reference server::

    GET  /health    -> {"status": "ok"}                                   (no token needed)
    GET  /info      -> {"kind": "reference", "protocol": 1, "model": str, "vocab_size": int,
                        "tokenizer_hash": str | null, "dtype": str, "max_batch_tokens": int,
                        "context_length": int | null}
    POST /logprobs  {"prompt_ids": [[int]], "response_ids": [[int]], "temperature": float}
                    -> {"logprobs": [[float]]}    one list per response, len(response_ids[i]) each

``logprobs[i][t] = log softmax(z_t / temperature)[response_ids[i][t]]`` where ``z_t`` are the
logits that predict response token ``t`` given the prompt and the response tokens before it.

Reward server::

    GET  /health, GET /info -> {"kind": "reward", "protocol": 1, "reward": str}
    POST /rewards   {"prompts": [str], "completions": [str], "query": [str], "labels": [...],
                     <column>: [...], ...}  ->  {"rewards": [float]}

``query[i] = prompts[i] + completions[i]`` and ``labels`` are there for servers written for
OpenRLHF's remote reward protocol (``{"query", "prompts", "labels"} -> {"rewards"}``); a server
may ignore them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PROTOCOL_VERSION = 1
HEALTH, INFO, LOGPROBS, REWARDS = "/health", "/info", "/logprobs", "/rewards"
RESERVED_REWARD_FIELDS = ("prompts", "completions", "query", "labels")


def tokenizer_hash(tokenizer: Any) -> str | None:
    """A fingerprint of the token -> id mapping (first 16 hex digits of the SHA-256 of the
    sorted vocabulary as JSON); ``None`` without a tokenizer. Two tokenizers with the same hash
    turn the same ids into the same tokens."""
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def model_vocab_size(model: Any) -> int:
    """Rows of the model's output layer (the size of the distribution it predicts)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def labels_of(columns: dict[str, list], n: int, label_column: str = "label") -> list:
    """OpenRLHF's ``labels``: the ``labels`` column, else ``label_column``, else ``answer``,
    else ``n`` nulls."""
    for name in ("labels", label_column, "answer"):
        if name in columns:
            return list(columns[name])
    return [None] * n
