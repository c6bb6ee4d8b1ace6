"""Rollout servers from the trainer's side: one server, and the pool that spreads requests over them.

Two kinds of server, by URL:

* ``http(s)://host:port``: ``reinforcepp serve rollout`` (:mod:`reinforcepp.serve.rollout`). It
  holds several weight versions of the run (staged beside the active one) and refuses a request
  for a version it does not hold (HTTP 409).
* ``vllm+http(s)://host:port``: a plain ``vllm serve`` (its OpenAI-compatible
  ``/v1/completions`` with token ids, started with this package's worker extension and its
  development endpoints, docs/remote.md). It holds one version, the last one pushed to it; a
  request for an older version is served by it (a fresher policy, never a staler one).

:class:`RolloutPool` sends each call's prompts, in parts, to the server with the fewest tokens in
flight among those holding the version the call needs; a part whose server fails (unreachable,
deadline, HTTP 5xx) is sent to another. A failed server is probed again now and then: it is used
again once it answers and holds the version asked for (after a restart: once the next push has
given it the current weights). The call fails, in one line naming every server, only when none is
left. Weight pushes stream pieces to every server (:mod:`.weights`). One server, its checks and its
request format: :mod:`.rollout_server`.
"""

from __future__ import annotations

import base64
import collections
import logging
import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from .client import RemoteError, RemoteSettings, RemoteStatusError
from .protocol import VERSION_NOT_HELD, VLLM_LOAD_METHOD, VLLM_RPC, VLLM_WEIGHT_VERSION, WEIGHTS, WEIGHTS_COMMIT
from .rollout_server import Expected, RolloutServer, check_rollout_url
from .weights import PieceWriter, chunks_of, sha256

logger = logging.getLogger(__name__)

PIECE_BYTES = 64 << 20
"""a weight piece holds about this many bytes (a larger tensor is a piece of its own)"""
PROBE_INTERVAL_S = 2.0
"""a failed server is probed again at most this often"""


@dataclass
class Rows:
    """A call's answer, in the call's order: ``P * k`` rows."""

    response_ids: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]
    versions: list[int]


class RolloutPool:
    """Rollout servers behind one interface (module docstring).

    Args:
        urls: the servers (``http(s)://...`` ours, ``vllm+http(s)://...`` plain vLLM).
        settings: token, concurrency (requests in flight to one server) and retries (rounds of
            waiting for a server when none is left, with exponential backoff).
        timeout: seconds one request (a generation, a weight chunk) may take.
    """

    def __init__(self, urls: list[str], settings: RemoteSettings, *, timeout: float) -> None:
        if not urls:
            raise RemoteError("rollout_urls is empty")
        self.servers = [RolloutServer(check_rollout_url(u), settings, timeout) for u in urls]
        self.settings = settings
        self.run = ""
        self.expect: Optional[Expected] = None
        self.lock = threading.Lock()
        self.vllm_lock = threading.Condition()
        self.vllm_busy, self.vllm_pushing = 0, False
        self.threads = ThreadPoolExecutor(
            max_workers=max(2, len(self.servers) * settings.concurrency), thread_name_prefix="rollout-pool"
        )
        # pushes have threads of their own: generation parts waiting for a push to a vLLM server to end
        # must not hold every thread the push needs
        self.push_threads = ThreadPoolExecutor(max_workers=max(2, len(self.servers)), thread_name_prefix="rollout-push")
        self.last_push: dict[str, float] = {}
        self.refusals: list[str] = []
        self.failovers = 0

    @property
    def has_vllm(self) -> bool:
        return any(s.vllm for s in self.servers)

    def connect(self, expect: Expected) -> None:
        """Check every server (one line naming the first that does not fit)."""
        self.expect = expect
        for s in self.servers:
            s.connect(expect)

    def close(self) -> None:
        self.threads.shutdown(wait=False)
        self.push_threads.shutdown(wait=False)
        for s in self.servers:
            s.client.close()
            s.probe.close()

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompts: list[list[int]], k: int, sampling: dict, seeds: Optional[list[int]], version: int
    ) -> Rows:
        """``k`` samples of each prompt with weight ``version``: the prompts split into parts
        (two per server up), each sent to the least loaded server that holds the version,
        a failed part sent again elsewhere."""
        assert self.expect is not None, "connect() first"
        n = len(prompts)
        usable = max(1, sum(s.alive for s in self.servers))
        parts = min(n, 2 * usable)
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        results: list[Optional[dict]] = [None] * parts
        pending = collections.deque(range(parts))
        running: dict[Future, tuple[int, RolloutServer, int]] = {}
        rounds = 0
        stop_ids = [e for e in self.expect.eos_token_ids if e < self.expect.vocab_size]
        while pending or running:
            while pending:
                server = self._pick(version)
                if server is None:
                    break
                part = pending.popleft()
                lo, hi = bounds[part], bounds[part + 1]
                tokens = sum(len(p) + sampling["max_new_tokens"] for p in prompts[lo:hi]) * k
                with self.lock:
                    server.inflight += 1
                    server.inflight_tokens += tokens
                future = self.threads.submit(
                    self._call,
                    server,
                    prompts[lo:hi],
                    k,
                    sampling,
                    None if seeds is None else seeds[lo:hi],
                    version,
                    stop_ids,
                )
                running[future] = (part, server, tokens)
            if not running:
                if self._revive(version):
                    continue
                if rounds >= self.settings.retries:
                    raise RemoteError(self._none_left(version))
                time.sleep(min(30.0, self.settings.backoff * 2**rounds))
                rounds += 1
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                part, server, tokens = running.pop(future)
                with self.lock:
                    server.inflight -= 1
                    server.inflight_tokens -= tokens
                try:
                    answer = future.result()
                except RemoteStatusError as exc:
                    if exc.status == VERSION_NOT_HELD:  # it does not hold the version (any more): another server
                        answer = exc.answer if isinstance(exc.answer, dict) else {}
                        server.versions = set(answer.get("versions") or []) if answer.get("run") == self.run else set()
                        if answer.get("run") not in (self.run, None):
                            server.reason = f"another run ({answer.get('run')}) pushed its weights to it since"
                    elif exc.status >= 500:
                        server.fail(str(exc))
                    else:
                        raise
                    self.failovers += 1
                    pending.appendleft(part)
                    continue
                except RemoteError as exc:  # unreachable, or no answer within the deadline
                    server.fail(str(exc))
                    self.failovers += 1
                    pending.appendleft(part)
                    continue
                lo, hi = bounds[part], bounds[part + 1]
                results[part] = self._checked(server, answer, (hi - lo) * k, sampling["max_new_tokens"], version)
                server.served_parts += 1
        rows = Rows([], [], [], [])
        for result in results:
            assert result is not None
            rows.response_ids += result["response_ids"]
            rows.logprobs += result["logprobs"]
            rows.truncated += result["truncated"]
            rows.versions += [result["weight_version"]] * len(result["response_ids"])
        return rows

    def _call(
        self,
        server: RolloutServer,
        prompts: list[list[int]],
        k: int,
        sampling: dict,
        seeds: Optional[list[int]],
        version: int,
        stop_ids: list[int],
    ) -> dict:
        if not server.vllm:
            return server.generate(prompts, k, sampling, seeds, self.run, version, stop_ids)
        with self.vllm_lock:  # no generation on a vLLM server while weights are loaded into it
            while self.vllm_pushing:
                self.vllm_lock.wait()
            self.vllm_busy += 1
        try:
            return server.generate(prompts, k, sampling, seeds, self.run, version, stop_ids)
        finally:
            with self.vllm_lock:
                self.vllm_busy -= 1
                self.vllm_lock.notify_all()

    def _pick(self, version: int) -> Optional[RolloutServer]:
        with self.lock:
            ready = [s for s in self.servers if s.alive and s.holds(version) and s.inflight < self.settings.concurrency]
            return min(ready, key=lambda s: s.inflight_tokens) if ready else None

    def _revive(self, version: int) -> bool:
        """Probe the servers that cannot take the call now (failed, or without the version):
        True when one of them answers and holds ``version``."""
        found = False
        for s in self.servers:
            if s.alive and s.holds(version):
                continue
            if time.monotonic() - s.last_probe < PROBE_INTERVAL_S:
                continue
            if s.refresh(self.run) and s.holds(version):
                if not s.alive:
                    logger.warning("rollout server %s is back, holding weight version %d", s.name, version)
                s.alive, found = True, True
        return found

    def _none_left(self, version: int) -> str:
        states = "; ".join(
            f"{s.name}: {s.reason or 'up, without it'}" if not (s.alive and s.holds(version)) else f"{s.name}: busy"
            for s in self.servers
        )  # reason: why it failed, or that another run took it over
        return f"no rollout server left that holds weight version {version} of this run ({states})"

    def _checked(self, server: RolloutServer, answer: Any, rows: int, max_new_tokens: int, version: int) -> dict:
        """The answer of one part, or a one-line error naming the server."""
        where = f"rollout server {server.name}"
        if not isinstance(answer, dict):
            raise RemoteError(f"{where} answered {type(answer).__name__}, not a JSON object")
        ids, lps, trunc, used = (answer.get(k) for k in ("response_ids", "logprobs", "truncated", "weight_version"))
        if not all(isinstance(x, list) and len(x) == rows for x in (ids, lps, trunc)):
            raise RemoteError(f"{where} answered {len(ids) if isinstance(ids, list) else ids!r} responses for {rows}")
        assert isinstance(ids, list) and isinstance(lps, list) and isinstance(trunc, list)
        if not isinstance(used, int) or (used != version and not (server.vllm and used >= version)):
            raise RemoteError(f"{where} sampled with weight version {used!r}, not {version}")
        vocab = self.expect.vocab_size if self.expect is not None else 0
        for i, (row, lp) in enumerate(zip(ids, lps)):
            if not isinstance(row, list) or not row or len(row) > max_new_tokens:
                raise RemoteError(
                    f"{where}: response {i} has {len(row) if isinstance(row, list) else row!r} tokens "
                    f"(1 to {max_new_tokens} expected)"
                )
            bad = next((t for t in row if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
            if bad is not None or any(isinstance(t, bool) for t in row):
                raise RemoteError(
                    f"{where}: response {i} holds token id {bad!r}, outside the policy's vocabulary [0, {vocab})"
                )
            if (
                not isinstance(lp, list)
                or len(lp) != len(row)
                or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in lp)
            ):
                raise RemoteError(f"{where}: response {i} has no finite log-prob for each of its {len(row)} tokens")
        return {"response_ids": ids, "logprobs": lps, "truncated": [bool(t) for t in trunc], "weight_version": used}

    # ------------------------------------------------------------------ weights
    def push(
        self,
        version: int,
        weights: Optional[Iterable[tuple[str, torch.Tensor]]],
        *,
        same_as: Optional[int] = None,
        send: bool = True,
    ) -> None:
        """Give every server weight ``version``: ``weights`` (iterated to the end whatever
        happens: under FSDP each item is a collective), or the same as version ``same_as``.
        ``send=False`` (torchrun ranks but 0) only iterates. Servers that fail are left out;
        servers that are back take part. The versions they hold are known after it."""
        if not send:
            for _ in weights or ():
                pass
            with self.lock:
                for s in self.servers:
                    if s.alive:
                        s.versions.add(version)
                        if s.vllm:
                            s.vllm_version = version
            return
        start = time.perf_counter()
        for s in self.servers:
            if not s.alive and s.reachable():
                s.alive, s.versions, s.vllm_version = True, set(), None
        targets = [s for s in self.servers if s.alive]
        sent = 0
        self.refusals = []
        if weights is None:
            for s in targets:
                try:
                    self._alias(s, version, same_as)
                except RemoteError as exc:
                    self._failed(s, exc)
        else:
            states = {s.name: _PushState() for s in targets}
            groups: dict[Optional[torch.dtype], list[RolloutServer]] = {}
            for s in targets:
                groups.setdefault(s.dtype, []).append(s)
            writers = {dtype: PieceWriter(PIECE_BYTES, dtype) for dtype in groups}
            for name, tensor in weights:
                for dtype, writer in writers.items():
                    piece = writer.add(name, tensor)
                    if piece is not None:
                        sent += self._send(piece, groups[dtype], states, version)
            for dtype, writer in writers.items():
                piece = writer.flush()
                if piece is not None:
                    sent += self._send(piece, groups[dtype], states, version)
            for s in targets:
                if s.alive:
                    try:
                        self._commit(s, version, states[s.name])
                    except RemoteError as exc:
                        self._failed(s, exc)
        if self.refusals:  # a server that refuses the weights (another model): the run cannot go on as asked
            raise RemoteError(self.refusals[0])
        if not any(s.alive for s in self.servers):
            raise RemoteError(
                "no rollout server left to take weight version "
                f"{version}: " + "; ".join(f"{s.name}: {s.reason}" for s in self.servers)
            )
        self.last_push = {"version": float(version), "bytes": float(sent), "seconds": time.perf_counter() - start}

    def _send(self, piece: bytes, servers: list[RolloutServer], states: dict[str, _PushState], version: int) -> int:
        live = [s for s in servers if s.alive]
        futures = {self.push_threads.submit(self._send_one, s, piece, states[s.name], version): s for s in live}
        for future, s in futures.items():
            try:
                future.result()
            except RemoteError as exc:
                self._failed(s, exc)
        return len(piece) * len(live)

    def _failed(self, s: RolloutServer, exc: RemoteError) -> None:
        """A server failed during a push: left out of it; one that refused the weights (HTTP
        4xx: another model, a bad token) is reported once the push is over."""
        if isinstance(exc, RemoteStatusError) and 400 <= exc.status < 500:
            said = exc.answer.get("error") if isinstance(exc.answer, dict) else None
            self.refusals.append(f"rollout server {s.name} refused the weights: {said}" if said else str(exc))
        s.fail(str(exc))

    def _send_one(self, s: RolloutServer, piece: bytes, state: _PushState, version: int) -> None:
        if s.vllm:
            s.client.post(VLLM_RPC, {"method": VLLM_LOAD_METHOD, "args": [base64.b64encode(piece).decode()]})
            return
        for chunk, end in chunks_of(piece, s.chunk_bytes):
            s.client.post_bytes(
                WEIGHTS,
                chunk,
                {"run": self.run, "version": version, "chunk": state.chunks, "end": int(end), "sha256": sha256(chunk)},
            )
            state.chunks += 1
            state.size += len(chunk)
            state.digest.update(chunk)

    def _commit(self, s: RolloutServer, version: int, state: _PushState) -> None:
        if s.vllm:
            self._vllm_version(s, version)
            return
        answer = s.client.post(
            WEIGHTS_COMMIT,
            {
                "run": self.run,
                "version": version,
                "chunks": state.chunks,
                "bytes": state.size,
                "sha256": state.digest.hexdigest(),
            },
        )
        s.versions = set(answer.get("versions") or [])

    def _alias(self, s: RolloutServer, version: int, same_as: Optional[int]) -> None:
        if s.vllm:
            if s.vllm_version != same_as:
                raise RemoteError(f"rollout server {s.name} does not hold weight version {same_as}")
            self._vllm_version(s, version)
            return
        try:
            answer = s.client.post(WEIGHTS_COMMIT, {"run": self.run, "version": version, "same_as": same_as})
        except RemoteStatusError as exc:
            if exc.status != VERSION_NOT_HELD:
                raise
            s.versions = set()  # it missed the last push: it takes part again at the next full one
            return
        s.versions = set(answer.get("versions") or [])

    def _vllm_version(self, s: RolloutServer, version: int) -> None:
        s.client.post("/reset_prefix_cache", {})
        s.client.post(VLLM_WEIGHT_VERSION, {"new_version": f"{self.run}:{version}"})
        s.vllm_version = version

    def exclusive_vllm(self) -> Any:
        """A context in which no request of this process runs on a vLLM server (pushes load
        the weights in place)."""
        pool = self

        class _Exclusive:
            def __enter__(self) -> None:
                with pool.vllm_lock:
                    pool.vllm_pushing = True
                    while pool.vllm_busy:
                        pool.vllm_lock.wait()

            def __exit__(self, *exc: Any) -> None:
                with pool.vllm_lock:
                    pool.vllm_pushing = False
                    pool.vllm_lock.notify_all()

        return _Exclusive()


class _PushState:
    """One server's side of a push: chunks and bytes sent, and their running SHA-256."""

    def __init__(self) -> None:
        import hashlib

        self.chunks = self.size = 0
        self.digest = hashlib.sha256()
