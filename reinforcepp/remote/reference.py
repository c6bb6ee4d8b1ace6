"""A reference model behind a URL, with the local reference's interface.

The trainer asks a reference for ``(B, T)`` float32 log-probs of a padded batch
``[prompt (left-padded) | response (right-padded)]``; :class:`RemoteReference` answers that
question by sending the unpadded token ids to a reference server (``reinforcepp serve
reference``, protocol in :mod:`reinforcepp.remote.protocol`) and padding the answer back. No KV
cache or logits cross the wire, so it works with ``share_prompt`` on or off, under torchrun
(each rank calls the server for its own responses) and with every estimator and KL placement.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .client import RemoteClient, RemoteError, RemoteSettings
from .protocol import INFO, LOGPROBS, PROTOCOL_VERSION, model_vocab_size, tokenizer_hash

SERVE_HINT = "start one with `reinforcepp serve reference --model PATH --port PORT`"


def split_batch(
    input_ids: Tensor, attention_mask: Tensor, response_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Padded ``(B, P + T)`` ids and mask -> the ``B`` prompt and response token lists."""
    ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
    p = ids.shape[1] - response_length
    prompts = [row[m].tolist() for row, m in zip(ids[:, :p], mask[:, :p])]
    responses = [row[m].tolist() for row, m in zip(ids[:, p:], mask[:, p:])]
    return prompts, responses


class RemoteReference:
    """Reference log-probs from a server.

    Args:
        url: the server's base URL, ``http(s)://host:port``.
        settings: timeout, retries, token, concurrency (:class:`RemoteSettings`).
        temperature: the sampling temperature; log-probs are those of ``softmax(z / temperature)``
            as for a local reference.
        batch_size: responses per request; a micro-batch becomes ``ceil(B / batch_size)``
            requests sent concurrently.
    """

    def __init__(
        self, url: str, settings: RemoteSettings | None = None, *, temperature: float = 1.0, batch_size: int = 64
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.client = RemoteClient(url, settings or RemoteSettings(), what="reference server")
        self.url = self.client.base_url.rstrip("/")
        self.temperature = float(temperature)
        self.batch_size = batch_size
        self.info: dict[str, Any] = {}

    def connect(self, policy: torch.nn.Module | None = None, tokenizer: Any = None) -> dict[str, Any]:
        """Read ``/info`` and check the server against the policy: same vocabulary size and, when
        both sides know it, the same tokenizer. Every failure is one line naming the URL."""
        try:
            info = self.client.get(INFO)
        except RemoteError as exc:
            if "could not be reached" in str(exc):
                raise RemoteError(f"reference server {self.url} does not answer; {SERVE_HINT}") from None
            raise
        if not isinstance(info, dict) or info.get("kind") != "reference":
            raise RemoteError(f"{self.url}{INFO} is not a reinforcepp reference server (answer: {str(info)[:120]})")
        if info.get("protocol") != PROTOCOL_VERSION:
            raise RemoteError(f"reference server {self.url} speaks protocol {info.get('protocol')}; "
                              f"this client speaks {PROTOCOL_VERSION}")
        if policy is not None:
            mine = model_vocab_size(policy)
            if int(info.get("vocab_size", -1)) != mine:
                raise RemoteError(f"reference server {self.url} has vocab size {info.get('vocab_size')}, "
                                  f"the policy {mine}: serve a reference with the policy's vocabulary")
        theirs, ours = info.get("tokenizer_hash"), tokenizer_hash(tokenizer)
        if theirs and ours and theirs != ours:
            raise RemoteError(f"reference server {self.url} uses another tokenizer (hash {theirs}, "
                              f"the policy's {ours}): serve a reference with the policy's tokenizer")
        self.info = info
        return info

    def response_logprobs(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """``(B, P + T)`` padded ids and mask -> ``(B, T)`` float32 reference log-probs (0 on
        response padding), on the CPU."""
        prompts, responses = split_batch(input_ids, attention_mask, response_length)
        step = self.batch_size
        payloads: list[dict[str, Any]] = [
            {"prompt_ids": prompts[i : i + step], "response_ids": responses[i : i + step],
             "temperature": self.temperature}
            for i in range(0, len(prompts), step)
        ]
        answers = self.client.post_many(LOGPROBS, payloads)
        out = torch.zeros(len(prompts), response_length, dtype=torch.float32)
        row = 0
        for payload, answer in zip(payloads, answers):
            got = answer.get("logprobs") if isinstance(answer, dict) else None
            if not isinstance(got, list) or len(got) != len(payload["response_ids"]):
                raise RemoteError(f"reference server {self.url}{LOGPROBS}: expected {{'logprobs': [...]}} with "
                                  f"{len(payload['response_ids'])} rows, got {str(answer)[:120]}")
            for values, ids in zip(got, payload["response_ids"]):
                if not isinstance(values, list) or len(values) != len(ids):
                    got_n = len(values) if isinstance(values, list) else values
                    raise RemoteError(f"reference server {self.url}{LOGPROBS}: row {row} has {got_n!r} "
                                      f"log-probs for {len(ids)} tokens")
                try:
                    out[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
                except (TypeError, ValueError, RuntimeError):
                    raise RemoteError(f"reference server {self.url}{LOGPROBS}: row {row} is not a list of numbers: "
                                      f"{str(values)[:80]}") from None
                row += 1
        if not torch.isfinite(out).all():
            raise RemoteError(f"reference server {self.url} returned non-finite log-probs")
        return out

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"RemoteReference({self.url!r})"
