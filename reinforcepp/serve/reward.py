"""``reinforcepp serve reward``: a reward source over HTTP (this project's protocol and OpenRLHF's)."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime.
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..remote.protocol import INFO, PROTOCOL_VERSION, RESERVED_REWARD_FIELDS, REWARDS
from ..rewards import RewardError, RewardScorer, RewardSource
from .app import BadRequest, json_response, make_app, read_json


def reward_app(
    fn: Callable[..., Any], *, spec: str, token: str | None = None, max_request_bytes: int = 32 << 20, threads: int = 1
) -> Any:
    """The FastAPI app of a reward server scoring with ``fn`` (TRL convention). Accepts this
    project's request and OpenRLHF's (``query`` and ``prompts`` without ``completions``: the
    completion is ``query[i]`` with ``prompts[i]`` removed from its start)."""
    from fastapi import Request

    scorer = RewardScorer([RewardSource(getattr(fn, "__name__", "reward"), fn)], on_error="raise")
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reward")
    app = make_app("reinforcepp reward", token, max_request_bytes)

    @app.get(INFO)
    async def get_info() -> dict:
        return {"kind": "reward", "protocol": PROTOCOL_VERSION, "reward": spec}

    @app.post(REWARDS)
    async def rewards(request: Request) -> Any:
        data = await read_json(request, max_request_bytes)
        prompts, completions = data.get("prompts"), data.get("completions")
        if completions is None and isinstance(data.get("query"), list) and isinstance(prompts, list):
            if len(prompts) != len(data["query"]) or not all(
                isinstance(q, str) and isinstance(p, str) and q.startswith(p) for q, p in zip(data["query"], prompts)
            ):
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
