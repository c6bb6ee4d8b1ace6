"""What the clients and the servers agree on: paths, payloads, the tokenizer fingerprint.

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

Rollout server (``reinforcepp serve rollout``)::

    GET  /health, GET /info -> {"kind": "rollout", "protocol": 1, "model": str, "engine": "hf" | "vllm",
                                "vocab_size": int, "tokenizer_hash": str | null, "eos_token_ids": [int],
                                "dtype": str, "run": str | null, "weight_version": int | null,
                                "versions": [int], "keep_versions": int, "max_request_bytes": int,
                                "served": {version: responses}, "tokens_generated": int}
    POST /generate  {"prompt_ids": [[int]], "samples_per_prompt": k, "max_new_tokens": int,
                     "temperature": float, "top_p": float, "top_k": int, "greedy": bool,
                     "seeds": [int] | null, "run": str, "weight_version": int}
                    -> {"response_ids": [[int]], "logprobs": [[float]], "truncated": [bool],
                        "finish_reasons": ["stop" | "length"], "weight_version": int}
                    409 {"error": str, "versions": [int], "run": str | null} when the server
                    does not hold (run, weight_version)
    POST /weights?run=R&version=V&chunk=I&end=0|1&sha256=H   body: bytes (application/octet-stream)
                    -> {"chunk": I}
    POST /weights/commit {"run": R, "version": V, "chunks": n, "bytes": int, "sha256": str}
                      or {"run": R, "version": V, "same_as": U}
                    -> {"run": R, "versions": [int], "weight_version": int | null}

``k`` responses per prompt, prompt by prompt; ``seeds[i]`` seeds prompt ``i``'s draws (the same
seed, weights and prompt give the same samples on any server). A weight push is a sequence of
*pieces*, each a safetensors file of whole tensors (Hugging Face names), sent in chunks in order
(``end=1`` on a piece's last chunk); ``sha256`` checks each chunk, and the commit's ``sha256``
the concatenation of every chunk in order. A committed version is *held* (staged) beside the
active one, at most ``keep_versions`` of them; a request for a held version activates it. A
commit of version ``V`` drops the run's versions above ``V`` and every other run's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PROTOCOL_VERSION = 1
HEALTH, INFO, LOGPROBS, REWARDS = "/health", "/info", "/logprobs", "/rewards"
GENERATE, WEIGHTS, WEIGHTS_COMMIT = "/generate", "/weights", "/weights/commit"
VERSION_NOT_HELD = 409
"""the status of a request for a weight version the rollout server does not hold"""
FINISH_STOP, FINISH_LENGTH = "stop", "length"
VLLM_SCHEME = "vllm+"
"""``vllm+http://host:port``: a plain ``vllm serve`` (OpenAI completions API) as a rollout server"""
VLLM_COMPLETIONS, VLLM_RPC, VLLM_WEIGHT_VERSION, VLLM_WEIGHT_INFO = (
    "/v1/completions", "/collective_rpc", "/update_weight_version", "/weight_info")
VLLM_LOAD_METHOD = "reinforcepp_load_weights_b64"
"""the worker method (``reinforcepp.engines.vllm_worker.WeightSync``) that loads one base64 safetensors piece"""
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
