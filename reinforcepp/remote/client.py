"""The one HTTP client of every remote service (reference log-probs, rewards).

Each call is ``POST``/``GET`` of JSON with:

- a **total deadline per attempt** (``timeout`` seconds from connecting to the last byte of the
  answer, enforced by cancelling the attempt: a server that trickles one byte at a time cannot
  hold a call longer than that);
- **retries** with exponential backoff (``backoff * 2**i`` seconds, at most 30 s, or the
  server's ``Retry-After`` when it is shorter than that) on connection errors and on HTTP 502,
  503 and 504; a timed-out attempt and every other status are not retried;
- **redirects never followed** (a 3xx answer is an error naming the target);
- **no proxy for loopback** (``127.0.0.0/8``, ``::1``, ``localhost``; other hosts use the
  environment's ``HTTP(S)_PROXY`` / ``NO_PROXY`` as usual);
- a **bearer token** (:func:`read_token`: ``remote_token_file``, else the
  ``REINFORCEPP_REMOTE_TOKEN`` environment variable);
- a **response size limit** (``max_response_bytes``; the answer is read in chunks and dropped as
  soon as it exceeds the limit);
- **concurrent requests** (:meth:`RemoteClient.post_many`, at most ``concurrency`` in flight).

The calls run on an event loop owned by the client in a background thread, so the client works
the same from a script, a notebook (whose own loop is left alone) or a torchrun rank.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

TOKEN_ENV = "REINFORCEPP_REMOTE_TOKEN"
RETRIED_STATUS = (502, 503, 504)
MAX_BACKOFF_S = 30.0


class RemoteError(RuntimeError):
    """A remote service failed: unreachable, an HTTP error, a deadline, a bad answer. The
    message is one line naming the URL."""


class RemoteUnreachable(RemoteError):
    """Nothing answered (connection refused or reset, after the retries)."""


class RemoteStatusError(RemoteError):
    """The server answered with an HTTP error status: ``status`` and its decoded JSON answer
    (``answer``, None when it was not JSON)."""

    def __init__(self, message: str, status: int, answer: Any = None) -> None:
        super().__init__(message)
        self.status, self.answer = status, answer


@dataclass(frozen=True)
class RemoteSettings:
    """How a :class:`RemoteClient` calls its server (the ``remote_*`` config keys).

    Attributes:
        timeout: seconds one attempt may take in total (connect, send, wait, receive).
        retries: further attempts after a connection error or HTTP 502/503/504.
        token: bearer token sent as ``Authorization: Bearer <token>`` (``None``: none sent).
        concurrency: requests in flight at once in :meth:`RemoteClient.post_many`.
        max_response_bytes: a longer answer is an error.
        backoff: seconds before the first retry; doubled at each further retry.
    """

    timeout: float = 60.0
    retries: int = 3
    token: str | None = None
    concurrency: int = 4
    max_response_bytes: int = 64 << 20
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if (not self.timeout > 0 or self.retries < 0 or self.concurrency < 1 or self.max_response_bytes < 1
                or self.backoff < 0):
            raise ValueError(f"invalid RemoteSettings {self}: need timeout > 0, retries >= 0, concurrency >= 1, "
                             "max_response_bytes >= 1, backoff >= 0")

    def __repr__(self) -> str:  # never print the token
        hidden = None if self.token is None else "***"
        return (f"RemoteSettings(timeout={self.timeout}, retries={self.retries}, token={hidden}, "
                f"concurrency={self.concurrency}, max_response_bytes={self.max_response_bytes}, "
                f"backoff={self.backoff})")


def read_token(token_file: str | None = None) -> str | None:
    """The bearer token: the first line of ``token_file`` when given, else the
    ``REINFORCEPP_REMOTE_TOKEN`` environment variable, else ``None``."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise RemoteError(f"remote_token_file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        if not token:
            raise RemoteError(f"remote_token_file {str(path)!r} is empty")
        return token.splitlines()[0].strip()
    return os.environ.get(TOKEN_ENV) or None


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` or ``::1``."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, what: str) -> str:
    """``url`` itself; an error unless it is ``http(s)://host[:port][/path]`` without credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteError(f"{what}: {url!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise RemoteError(f"{what}: {url!r} carries credentials in the URL; use remote_token_file or {TOKEN_ENV}")
    return url


class RemoteClient:
    """JSON over HTTP to one server (module docstring for the guarantees).

    Args:
        base_url: ``http(s)://host[:port][/prefix]``; paths given to the calls are appended.
        settings: :class:`RemoteSettings`.
        what: how errors name the service ("reference server", "reward server").
    """

    def __init__(self, base_url: str, settings: RemoteSettings | None = None, *, what: str = "remote service") -> None:
        import httpx

        self.what = what
        self.base_url = check_url(base_url, what)
        self.settings = settings = settings or RemoteSettings()
        host = urlsplit(self.base_url).hostname or ""
        headers = {"Accept": "application/json", "User-Agent": "reinforcepp-remote/1"}
        if settings.token:
            headers["Authorization"] = f"Bearer {settings.token}"
            if urlsplit(self.base_url).scheme == "http" and not is_loopback(host):
                logger.warning("%s %s: the bearer token travels unencrypted over plain http; "
                               "use https for hosts other than loopback", what, self.base_url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"reinforcepp-remote-{host}", daemon=True)
        self._thread.start()
        limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)

        async def make() -> Any:
            # trust_env=False: no proxy (and no .netrc) for loopback; timeouts are ours (asyncio.wait_for)
            return httpx.AsyncClient(headers=headers, follow_redirects=False, trust_env=not is_loopback(host),
                                     timeout=None, limits=limits)

        self._http = self._run(make())
        self._closed = False

    # ------------------------------------------------------------------ public calls
    def get(self, path: str) -> Any:
        """``GET base_url + path`` -> the decoded JSON answer."""
        return self._run(self._call("GET", path, None))

    def post(self, path: str, payload: Any) -> Any:
        """``POST base_url + path`` with ``payload`` as JSON -> the decoded JSON answer."""
        return self._run(self._call("POST", path, self._encode(payload)))

    def post_bytes(self, path: str, data: bytes, params: dict[str, Any] | None = None) -> Any:
        """``POST base_url + path?params`` with ``data`` as ``application/octet-stream`` -> the
        decoded JSON answer (weight pieces for a rollout server)."""
        return self._run(self._call("POST", path, bytes(data), "application/octet-stream", params))

    def post_many(self, path: str, payloads: Sequence[Any]) -> list[Any]:
        """One POST per payload, at most ``concurrency`` in flight; answers in order. The first
        failure cancels the others and is raised."""
        bodies = [self._encode(p) for p in payloads]

        async def all_of() -> list[Any]:
            gate = asyncio.Semaphore(self.settings.concurrency)

            async def one(body: bytes) -> Any:
                async with gate:
                    return await self._call("POST", path, body)

            tasks = [asyncio.ensure_future(one(b)) for b in bodies]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:
                    t.cancel()

        return self._run(all_of())

    def url(self, path: str = "") -> str:
        """``base_url`` itself for ``""``, else ``base_url`` (without its trailing ``/``) + ``path``."""
        return self.base_url.rstrip("/") + path if path else self.base_url

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._http.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    # ------------------------------------------------------------------ internals
    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _encode(self, payload: Any) -> bytes:
        try:
            return json.dumps(payload, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise RemoteError(f"{self.what} {self.base_url}: the request is not JSON-serialisable ({exc})") from None

    async def _call(self, method: str, path: str, body: bytes | None, content_type: str = "application/json",
                    params: dict[str, Any] | None = None) -> Any:
        import httpx

        url = self.url(path)
        s = self.settings
        attempt = 0
        while True:
            try:
                attempt_call = self._attempt(method, url, body, content_type, params)
                status, headers, raw = await asyncio.wait_for(attempt_call, timeout=s.timeout)
            except asyncio.TimeoutError:
                raise RemoteError(
                    f"{self.what} {url}: no complete answer within remote_timeout={s.timeout:g}s"
                ) from None
            except httpx.TransportError as exc:
                if attempt >= s.retries:
                    raise RemoteUnreachable(f"{self.what} {url} could not be reached after {attempt + 1} attempt(s): "
                                            f"{_describe(exc)}") from None
                wait = min(MAX_BACKOFF_S, s.backoff * 2**attempt)
                logger.warning("%s %s: %s; retry %d/%d in %.1fs", self.what, url, _describe(exc), attempt + 1,
                               s.retries, wait)
            else:
                if status in RETRIED_STATUS and attempt < s.retries:
                    wait = _retry_after(headers.get("retry-after")) or min(MAX_BACKOFF_S, s.backoff * 2**attempt)
                    logger.warning("%s %s answered HTTP %d; retry %d/%d in %.1fs", self.what, url, status,
                                   attempt + 1, s.retries, wait)
                else:
                    return self._decode(url, status, headers, raw, attempt)
            attempt += 1
            await asyncio.sleep(wait)

    async def _attempt(self, method: str, url: str, body: bytes | None, content_type: str = "application/json",
                       params: dict[str, Any] | None = None) -> tuple[int, Any, bytes]:
        limit = self.settings.max_response_bytes
        headers = {"Content-Type": content_type} if body is not None else None
        async with self._http.stream(method, url, content=body, headers=headers, params=params) as response:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit and response.status_code < 300:
                raise RemoteError(
                    f"{self.what} {url}: the answer declares {int(declared)} bytes > the limit of {limit} bytes"
                )
            chunks, size = [], 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > limit:
                    raise RemoteError(f"{self.what} {url}: the answer exceeds the limit of {limit} bytes")
                chunks.append(chunk)
                if response.status_code >= 300 and size > 2000:
                    break  # an error page: its start is enough for the message
            return response.status_code, response.headers, b"".join(chunks)

    def _decode(self, url: str, status: int, headers: Any, raw: bytes, attempt: int) -> Any:
        if 300 <= status < 400:
            target = headers.get("location", "?")
            raise RemoteError(f"{self.what} {url} answered HTTP {status} redirecting to {target}; "
                              "redirects are not followed: set the URL to the final address")
        if status in (401, 403):
            why = "unauthorized" if status == 401 else "forbidden"
            raise RemoteStatusError(f"{self.what} {url} answered HTTP {status} ({why}): give the server's token in "
                                    f"remote_token_file or {TOKEN_ENV}", status)
        if status >= 400:
            tries = f" after {attempt + 1} attempts" if attempt else ""
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            raise RemoteStatusError(f"{self.what} {url} answered HTTP {status}{tries}: {_snippet(raw)}", status, answer)
        try:
            return json.loads(raw)
        except ValueError:
            raise RemoteError(f"{self.what} {url} answered non-JSON: {_snippet(raw)}") from None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]


def _snippet(raw: bytes, limit: int = 300) -> str:
    text = " ".join(raw[:limit].decode("utf-8", "replace").split())
    return text + ("..." if len(raw) > limit else "")


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After: <seconds>`` header, when short enough to wait for."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= MAX_BACKOFF_S else None


def wait_until_up(url: str, timeout: float = 60.0) -> None:
    """Poll ``url + /health`` until it answers 200 (scripts and tests that start a server)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url.rstrip("/") + "/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RemoteError(f"{url} did not come up within {timeout:g}s")
        time.sleep(0.1)
