"""One rollout server from the trainer's side: checking it against the policy, what it holds of
the run, and one generation request in its own API (``/generate`` of ``reinforcepp serve rollout``,
or vLLM's ``/v1/completions``). :class:`~.rollout.RolloutPool` spreads a call over several.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import torch

from .client import RemoteClient, RemoteError, RemoteSettings, RemoteStatusError, check_url, is_loopback
from .protocol import (
    GENERATE,
    HEALTH,
    INFO,
    PROTOCOL_VERSION,
    VLLM_COMPLETIONS,
    VLLM_RPC,
    VLLM_SCHEME,
    VLLM_WEIGHT_INFO,
)
from .weights import wire_dtype

logger = logging.getLogger(__name__)

SERVE_HINT = "start one with `reinforcepp serve rollout --model MODEL --port PORT`"
TOKENIZER_PROBE = "Rollout servers must tokenize alike: 0123456789 +-*/=?!. abc XYZ"


def check_rollout_url(url: str) -> str:
    """``url`` itself; a one-line error unless it is ``http(s)://host[:port]`` or ``vllm+http(s)://...``."""
    check_url(url.removeprefix(VLLM_SCHEME), "rollout_urls")
    return url


def needs_token(url: str) -> bool:
    """Whether the server is on another machine (a token is then required)."""
    return not is_loopback(urlsplit(url.removeprefix(VLLM_SCHEME)).hostname or "")


@dataclass(frozen=True)
class Expected:
    """What every server must agree with: the policy's vocabulary, tokenizer and EOS ids, and
    how many versions it must hold at once (``async_rollouts + 1``)."""

    vocab_size: int
    tokenizer_hash: Optional[str]
    eos_token_ids: tuple[int, ...]
    versions_needed: int = 1
    encode: Optional[Callable[[str], list[int]]] = None
    """the policy tokenizer's ``text -> ids`` (no special tokens): a vLLM server is checked by
    tokenizing a probe text"""


class RolloutServer:
    """One rollout server: its client, what it holds of the run, its load, whether it is up."""

    def __init__(self, url: str, settings: RemoteSettings, timeout: float) -> None:
        self.name = url
        self.vllm = url.startswith(VLLM_SCHEME)
        base = url.removeprefix(VLLM_SCHEME).rstrip("/")
        self.client = RemoteClient(base, replace(settings, retries=0, timeout=timeout), what="rollout server")
        self.probe = RemoteClient(
            base, replace(settings, retries=0, timeout=min(5.0, timeout), concurrency=1), what="rollout server"
        )
        self.url = self.client.base_url.rstrip("/")
        self.alive, self.reason, self.last_probe = True, "", 0.0
        self.versions: set[int] = set()
        """the run's versions it holds (what we know)"""
        self.vllm_version: Optional[int] = None
        """vLLM: the one version it holds"""
        self.inflight_tokens = self.inflight = 0
        self.info: dict[str, Any] = {}
        self.dtype: Optional[torch.dtype] = None
        self.chunk_bytes = 16 << 20
        self.model = ""
        self.served_parts = 0

    def __repr__(self) -> str:
        return f"RolloutServer({self.name!r}, alive={self.alive})"

    # ------------------------------------------------------------------ start
    def connect(self, expect: Expected) -> None:
        """Check the server against the policy; every failure is one line naming the server."""
        try:
            if self.vllm:
                self._connect_vllm(expect)
            else:
                self._connect_ours(expect)
        except RemoteError as exc:
            if "could not be reached" in str(exc) or "no complete answer" in str(exc):
                hint = "start it with `vllm serve` (docs/remote.md)" if self.vllm else SERVE_HINT
                raise RemoteError(f"rollout server {self.name} does not answer; {hint}") from None
            raise

    def _connect_ours(self, expect: Expected) -> None:
        info = self.client.get(INFO)
        if not isinstance(info, dict) or info.get("kind") != "rollout":
            raise RemoteError(
                f"{self.url}{INFO} is not a reinforcepp rollout server (answer: {str(info)[:120]}); a plain "
                f"vllm serve is given as vllm+{self.url}"
            )
        if info.get("protocol") != PROTOCOL_VERSION:
            raise RemoteError(
                f"rollout server {self.name} speaks protocol {info.get('protocol')}; "
                f"this client speaks {PROTOCOL_VERSION}"
            )
        self._check_vocab(info.get("vocab_size"), expect)
        theirs, ours = info.get("tokenizer_hash"), expect.tokenizer_hash
        if theirs and ours and theirs != ours:
            raise RemoteError(
                f"rollout server {self.name} uses another tokenizer (hash {theirs}, the policy's {ours}): "
                "serve the policy's tokenizer"
            )
        if sorted(info.get("eos_token_ids") or []) != sorted(expect.eos_token_ids):
            raise RemoteError(
                f"rollout server {self.name} stops at EOS ids {info.get('eos_token_ids')}, the policy's tokenizer at "
                f"{list(expect.eos_token_ids)}: serve the policy's tokenizer"
            )
        keep = int(info.get("keep_versions", 1))
        if keep < expect.versions_needed:
            raise RemoteError(
                f"rollout server {self.name} holds {keep} weight version(s); "
                f"async_rollouts={expect.versions_needed - 1} "
                f"needs {expect.versions_needed}: start it with --keep-versions {expect.versions_needed}"
            )
        self.info, self.dtype = info, wire_dtype(str(info.get("dtype")))
        self.chunk_bytes = max(1 << 16, min(32 << 20, int(info.get("max_request_bytes", 32 << 20)) // 2))

    def _connect_vllm(self, expect: Expected) -> None:
        models = self.client.get("/v1/models")
        try:
            self.model = str(models["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise RemoteError(
                f"{self.url}/v1/models is not vLLM's OpenAI-compatible API (answer: {str(models)[:120]})"
            ) from None
        try:
            described = self.client.post(VLLM_RPC, {"method": "reinforcepp_describe"})
        except RemoteStatusError as exc:
            raise RemoteError(
                f"rollout server {self.name} has no /collective_rpc with reinforcepp's worker extension "
                f"(HTTP {exc.status}): "
                "start it with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                "reinforcepp.engines.vllm_worker.WeightSync (docs/remote.md)"
            ) from None
        results = described.get("results") if isinstance(described, dict) else None
        if not results or not isinstance(results[0], dict):
            raise RemoteError(f"rollout server {self.name}: reinforcepp_describe answered {str(described)[:120]}")
        self._check_vocab(results[0].get("vocab_size"), expect)
        self.dtype = wire_dtype(str(results[0].get("dtype")))
        if expect.encode is not None:
            theirs = self.client.post(
                "/tokenize", {"model": self.model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
            )
            if not isinstance(theirs, dict) or theirs.get("tokens") != expect.encode(TOKENIZER_PROBE):
                raise RemoteError(
                    f"rollout server {self.name} tokenizes differently from the policy's tokenizer: "
                    "serve the policy's tokenizer"
                )
        self.info = {"kind": "vllm", "vocab_size": results[0].get("vocab_size"), "dtype": results[0].get("dtype")}

    def _check_vocab(self, theirs: Any, expect: Expected) -> None:
        if theirs != expect.vocab_size:
            raise RemoteError(
                f"rollout server {self.name} has vocab size {theirs}, the policy {expect.vocab_size}: "
                "serve the policy's model"
            )

    # ------------------------------------------------------------------ what it holds
    def holds(self, version: int) -> bool:
        if self.vllm:
            return self.vllm_version is not None and self.vllm_version >= version
        return version in self.versions

    def refresh(self, run: str) -> bool:
        """Ask the server (quickly) what it holds; False when it does not answer."""
        self.last_probe = time.monotonic()
        try:
            if self.vllm:
                got = str(self.probe.get(VLLM_WEIGHT_INFO).get("weight_version") or "")
                mine, _, v = got.partition(":")
                self.vllm_version = int(v) if mine == run and v.isdigit() else None
            else:
                info = self.probe.get(INFO)
                self.versions = set(info.get("versions") or []) if info.get("run") == run else set()
        except (RemoteError, AttributeError, TypeError, ValueError):
            return False
        return True

    def reachable(self) -> bool:
        self.last_probe = time.monotonic()
        try:
            self.probe.get(HEALTH)
        except RemoteError:
            return False
        return True

    def fail(self, reason: str) -> None:
        if self.alive:
            logger.warning("rollout server %s failed (%s); its requests go to the other servers", self.name, reason)
        self.alive, self.reason, self.last_probe = False, reason, time.monotonic()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[list[int]],
        k: int,
        sampling: dict,
        seeds: Optional[list[int]],
        run: str,
        version: int,
        stop_ids: list[int],
    ) -> dict:
        """One part of a call -> ``{"response_ids", "logprobs", "truncated", "weight_version"}``."""
        if not self.vllm:
            return self.client.post(
                GENERATE,
                {
                    "prompt_ids": prompts,
                    "samples_per_prompt": k,
                    **sampling,
                    "seeds": seeds,
                    "run": run,
                    "weight_version": version,
                },
            )
        held = self.vllm_version
        greedy = bool(sampling["greedy"])
        payloads = []
        for i, p in enumerate(prompts):
            body = {
                "model": self.model,
                "prompt": p,
                "n": k,
                "max_tokens": sampling["max_new_tokens"],
                "temperature": 0.0 if greedy else sampling["temperature"],
                "top_p": 1.0 if greedy else sampling["top_p"],
                "top_k": 0 if greedy else sampling["top_k"],
                "logprobs": 0,
                "return_token_ids": True,
                "stop_token_ids": stop_ids,
                "skip_special_tokens": False,
            }
            if seeds is not None:
                body["seed"] = seeds[i] % 2**63
            payloads.append(body)
        answers = self.client.post_many(VLLM_COMPLETIONS, payloads)
        out: dict[str, list] = {"response_ids": [], "logprobs": [], "truncated": []}
        for answer in answers:
            choices = (
                sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0)) if isinstance(answer, dict) else []
            )
            if len(choices) != k:
                raise RemoteError(
                    f"rollout server {self.name}{VLLM_COMPLETIONS} answered {len(choices)} choices for n={k}"
                )
            for c in choices:
                ids, lps = c.get("token_ids"), (c.get("logprobs") or {}).get("token_logprobs")
                out["response_ids"].append(ids)
                out["logprobs"].append(lps)
                out["truncated"].append(bool(ids) and isinstance(ids, list) and ids[-1] not in stop_ids)
        return {**out, "weight_version": held}
