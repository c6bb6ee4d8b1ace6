"""What every server of ``reinforcepp serve`` shares (FastAPI on uvicorn, the ``serve`` extra):
the app with its guard, JSON in and out, binding and running.

Every server speaks JSON (and safetensors for the weights a rollout server receives: nothing is
ever unpickled), checks a bearer token in constant time on every path but ``/health``, refuses
request bodies over ``max_request_bytes`` (HTTP 413) and bad payloads with HTTP 422 and a
one-line ``{"error": ...}``. The protocol is in
:mod:`reinforcepp.remote.protocol` and docs/remote.md. The apps: :mod:`.reference`, :mod:`.reward`,
:mod:`.rollout`.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime.
import hmac
import json
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from ..remote.protocol import HEALTH

logger = logging.getLogger("reinforcepp.serve")
MISSING_EXTRA = (
    "FastAPI and uvicorn are not installed: run `bash install.sh serve` (or pip install 'reinforcepp[serve]')"
)


class BadRequest(ValueError):
    """A request the server refuses, with the HTTP status, a one-line reason and any further
    fields of the JSON answer (``extra``)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


def require_fastapi() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SystemExit(MISSING_EXTRA) from None


# --------------------------------------------------------------------------- shared plumbing
def make_app(title: str, token: str | None, max_request_bytes: int, lifespan: Any = None) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    expected = f"Bearer {token}".encode() if token else None

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Any:
        if expected is not None and request.url.path != HEALTH:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return JSONResponse(
                {"error": f"request body of {declared} bytes > the limit of {max_request_bytes} bytes"},
                status_code=413,
            )
        try:
            return await call_next(request)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc), **exc.extra}, status_code=exc.status)
        except Exception as exc:
            logger.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse({"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"}, status_code=500)

    @app.get(HEALTH)
    async def health() -> dict:
        return {"status": "ok"}

    return app


def json_response(payload: Any) -> Any:
    """Plain ``json.dumps`` (FastAPI's encoder walks every number of a large answer)."""
    from fastapi.responses import Response

    return Response(content=json.dumps(payload), media_type="application/json")


async def read_body(request: Any, max_request_bytes: int) -> bytes:
    """The request body, read in chunks up to ``max_request_bytes`` (HTTP 413 beyond)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_request_bytes:
            raise BadRequest(413, f"request body > the limit of {max_request_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Any, max_request_bytes: int) -> dict:
    """The request body as a JSON object, read in chunks up to ``max_request_bytes``."""
    raw = await read_body(request, max_request_bytes)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(422, "the request body must be a JSON object")
    return data


async def drain(queue: Any) -> list:
    """Wait for the first job of an ``asyncio.Queue``, then take every job already queued with it:
    what arrived while the server was busy is batched into one forward."""
    jobs = [await queue.get()]
    while not queue.empty():
        jobs.append(queue.get_nowait())
    return jobs


def token_lists(data: dict, key: str, vocab_size: int) -> list[list[int]]:
    rows = data.get(key)
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise BadRequest(422, f"{key!r} must be a list of lists of token ids")
    for i, row in enumerate(rows):
        for t in row:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
                raise BadRequest(422, f"{key}[{i}] holds {t!r}, not a token id in [0, {vocab_size})")
    return rows


# --------------------------------------------------------------------------- running
def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    return sock


def run(app: Any, sock: socket.socket, announce: str) -> None:
    """Serve ``app`` on ``sock`` until interrupted; prints ``announce`` once listening."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    print(announce, flush=True, file=sys.stdout)
    server.run(sockets=[sock])
