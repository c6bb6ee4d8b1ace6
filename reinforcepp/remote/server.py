"""The servers of ``reinforcepp serve``: reference log-probs and rewards over HTTP (FastAPI on
uvicorn, the ``serve`` extra).

Both speak JSON only (nothing is ever unpickled), check a bearer token in constant time on every
path but ``/health``, refuse request bodies over ``max_request_bytes`` (HTTP 413) and bad payloads
with HTTP 422 and a one-line ``{"error": ...}``. The protocol is in
:mod:`reinforcepp.remote.protocol` and docs/remote.md.

The reference server batches concurrent requests: whatever has arrived while the model was busy
is packed, response by response in arrival order, into forward passes of at most
``max_batch_tokens`` padded tokens (``rows x (longest prompt + longest response)``; a longer single
response runs alone). Each forward is :func:`reinforcepp.lm.logprobs.response_logprobs` with
``share_prompt`` on, the trainer's own function, so the numbers are the local reference's.
"""


import asyncio
import hmac
import json
import logging
import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch

from .protocol import (
    HEALTH,
    INFO,
    LOGPROBS,
    PROTOCOL_VERSION,
    RESERVED_REWARD_FIELDS,
    REWARDS,
    model_vocab_size,
    tokenizer_hash,
)

logger = logging.getLogger("reinforcepp.serve")
MISSING_EXTRA = "FastAPI and uvicorn are not installed: run `bash install.sh serve` (or pip install 'reinforcepp[serve]')"


class BadRequest(ValueError):
    """A request the server refuses, with the HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def require_fastapi() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SystemExit(MISSING_EXTRA) from None


# --------------------------------------------------------------------------- shared plumbing
def _app(title: str, token: str | None, max_request_bytes: int, lifespan: Any = None) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    expected = f"Bearer {token}".encode() if token else None

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Any:
        if expected is not None and request.url.path != HEALTH:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return JSONResponse({"error": f"request body of {declared} bytes > the limit of {max_request_bytes} bytes"}, status_code=413)
        try:
            return await call_next(request)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
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


async def read_json(request: Any, max_request_bytes: int) -> dict:
    """The request body as a JSON object, read in chunks up to ``max_request_bytes``."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_request_bytes:
            raise BadRequest(413, f"request body > the limit of {max_request_bytes} bytes")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise BadRequest(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(422, "the request body must be a JSON object")
    return data


def _token_lists(data: dict, key: str, vocab_size: int) -> list[list[int]]:
    rows = data.get(key)
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise BadRequest(422, f"{key!r} must be a list of lists of token ids")
    for i, row in enumerate(rows):
        for t in row:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
                raise BadRequest(422, f"{key}[{i}] holds {t!r}, not a token id in [0, {vocab_size})")
    return rows


# --------------------------------------------------------------------------- reference
class LogprobBatcher:
    """Packs queued requests into token-budgeted forward passes run one at a time on a worker
    thread (the event loop keeps accepting requests meanwhile)."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, max_batch_tokens: int, chunk_size: int = 64) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_batch_tokens = max_batch_tokens
        self.chunk_size = chunk_size
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-forward")
        self.tokens_served = 0

    async def submit(self, prompts: list[list[int]], responses: list[list[int]], temperature: float) -> list[list[float]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((prompts, responses, temperature, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            while not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            for temperature in dict.fromkeys(job[2] for job in jobs):
                mine = [job for job in jobs if job[2] == temperature]
                rows = [(j, i) for j, job in enumerate(mine) for i in range(len(job[0]))]
                results: list[list[Any]] = [[None] * len(job[0]) for job in mine]
                try:
                    for part in self._pack(rows, mine):
                        prompts = [mine[j][0][i] for j, i in part]
                        responses = [mine[j][1][i] for j, i in part]
                        values = await loop.run_in_executor(self.worker, self.forward, prompts, responses, temperature)
                        for (j, i), v in zip(part, values):
                            results[j][i] = v
                except Exception as exc:  # noqa: BLE001 - the model failed: every waiting request hears it
                    for job in mine:
                        if not job[3].done():
                            job[3].set_exception(exc)
                    continue
                for job, result in zip(mine, results):
                    if not job[3].done():
                        job[3].set_result(result)

    def _pack(self, rows: list[tuple[int, int]], jobs: list) -> list[list[tuple[int, int]]]:
        parts: list[list[tuple[int, int]]] = []
        current: list[tuple[int, int]] = []
        p_max = t_max = 0
        for j, i in rows:
            p, t = max(p_max, len(jobs[j][0][i])), max(t_max, len(jobs[j][1][i]))
            if current and (len(current) + 1) * (p + t) > self.max_batch_tokens:
                parts.append(current)
                current, p, t = [], len(jobs[j][0][i]), len(jobs[j][1][i])
            current.append((j, i))
            p_max, t_max = p, t
        if current:
            parts.append(current)
        return parts

    @torch.inference_mode()
    def forward(self, prompts: list[list[int]], responses: list[list[int]], temperature: float) -> list[list[float]]:
        from ..lm.batch import collate
        from ..lm.logprobs import response_logprobs

        device = next(self.model.parameters()).device
        batch = collate(prompts, responses, self.pad_token_id)
        out = response_logprobs(self.model, batch.input_ids.to(device), batch.attention_mask.to(device), batch.response_length,
                                chunk_size=self.chunk_size, temperature=temperature, share_prompt=True).logprobs.float().cpu()
        self.tokens_served += int(batch.attention_mask.sum())
        return [out[r, : len(y)].tolist() for r, y in enumerate(responses)]


def reference_app(model: torch.nn.Module, tokenizer: Any, *, model_name: str, token: str | None = None, max_batch_tokens: int = 16384,
                  max_request_bytes: int = 32 << 20, pad_token_id: int | None = None) -> Any:
    """The FastAPI app of a reference server for ``model`` (already loaded, frozen)."""
    from fastapi import Request

    vocab = model_vocab_size(model)
    pad = pad_token_id if pad_token_id is not None else (getattr(tokenizer, "pad_token_id", None) or 0)
    batcher = LogprobBatcher(model, pad, max_batch_tokens)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    info = {"kind": "reference", "protocol": PROTOCOL_VERSION, "model": model_name, "vocab_size": vocab,
            "tokenizer_hash": tokenizer_hash(tokenizer), "dtype": dtype, "max_batch_tokens": max_batch_tokens}

    @asynccontextmanager
    async def lifespan(_app: Any):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=False)

    app = _app("reinforcepp reference", token, max_request_bytes, lifespan)
    app.state.batcher = batcher

    @app.get(INFO)
    async def get_info() -> dict:
        return {**info, "tokens_served": batcher.tokens_served}

    @app.post(LOGPROBS)
    async def logprobs(request: Request) -> Any:
        data = await read_json(request, max_request_bytes)
        prompts, responses = _token_lists(data, "prompt_ids", vocab), _token_lists(data, "response_ids", vocab)
        if len(prompts) != len(responses):
            raise BadRequest(422, f"{len(prompts)} prompt_ids rows but {len(responses)} response_ids rows")
        empty = [i for i, r in enumerate(responses) if not r]
        if empty:
            raise BadRequest(422, f"response_ids[{empty[0]}] is empty")
        longest = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=0)
        if longest > max_batch_tokens:
            raise BadRequest(422, f"a prompt + response of {longest} tokens > --max-batch-tokens={max_batch_tokens}")
        temperature = data.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise BadRequest(422, f"temperature must be a number > 0, got {temperature!r}")
        if not prompts:
            return json_response({"logprobs": []})
        return json_response({"logprobs": await batcher.submit(prompts, responses, float(temperature))})

    return app


# --------------------------------------------------------------------------- reward
def reward_app(fn: Callable[..., Any], *, spec: str, token: str | None = None, max_request_bytes: int = 32 << 20, threads: int = 1) -> Any:
    """The FastAPI app of a reward server scoring with ``fn`` (TRL convention). Accepts this
    project's request and OpenRLHF's (``query`` and ``prompts`` without ``completions``: the
    completion is ``query[i]`` with ``prompts[i]`` removed from its start)."""
    from fastapi import Request

    from ..rewards import RewardError, RewardScorer, RewardSource

    scorer = RewardScorer([RewardSource(getattr(fn, "__name__", "reward"), fn)], on_error="raise")
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reward")
    app = _app("reinforcepp reward", token, max_request_bytes)

    @app.get(INFO)
    async def get_info() -> dict:
        return {"kind": "reward", "protocol": PROTOCOL_VERSION, "reward": spec}

    @app.post(REWARDS)
    async def rewards(request: Request) -> Any:
        data = await read_json(request, max_request_bytes)
        prompts, completions = data.get("prompts"), data.get("completions")
        if completions is None and isinstance(data.get("query"), list) and isinstance(prompts, list):
            if len(prompts) != len(data["query"]) or not all(isinstance(q, str) and isinstance(p, str) and q.startswith(p) for q, p in zip(data["query"], prompts)):
                raise BadRequest(422, "OpenRLHF request: each query must start with its prompt")
            completions = [q[len(p):] for q, p in zip(data["query"], prompts)]
        for name, value in (("prompts", prompts), ("completions", completions)):
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise BadRequest(422, f"{name!r} must be a list of strings")
        assert isinstance(prompts, list) and isinstance(completions, list)
        columns = {k: v for k, v in data.items() if k not in RESERVED_REWARD_FIELDS or k == "labels"}
        for k, v in columns.items():
            if not isinstance(v, list) or len(v) != len(completions):
                raise BadRequest(422, f"column {k!r} must be a list of {len(completions)} values")
        try:
            result = await asyncio.get_running_loop().run_in_executor(pool, scorer, prompts, completions, columns)
        except RewardError as exc:
            raise BadRequest(422, " ".join(str(exc).split())[:1000]) from None
        return json_response({"rewards": result.rewards.tolist()})

    return app


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
