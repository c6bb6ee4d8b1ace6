"""``reinforcepp serve reference``: per-token log-probs of a frozen causal LM over HTTP.

The server batches concurrent requests: whatever has arrived while the model was busy is packed,
response by response in arrival order, into forward passes of at most ``max_batch_tokens`` padded
tokens (``rows x (longest prompt + longest response)``; a longer single response runs alone).
Each forward is :func:`reinforcepp.lm.logprobs.response_logprobs` with ``share_prompt`` on, the
trainer's own function, so the numbers are the local reference's.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime.
import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch

from ..lm.batch import collate
from ..lm.logprobs import response_logprobs
from ..lm.models import context_length
from ..remote.protocol import INFO, LOGPROBS, PROTOCOL_VERSION, model_vocab_size, tokenizer_hash
from .app import BadRequest, drain, json_response, make_app, read_json, token_lists


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

    async def submit(
        self, prompts: list[list[int]], responses: list[list[int]], temperature: float
    ) -> list[list[float]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((prompts, responses, temperature, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await drain(self.queue)
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
        device = next(self.model.parameters()).device
        batch = collate(prompts, responses, self.pad_token_id)
        out = response_logprobs(self.model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                batch.response_length, chunk_size=self.chunk_size, temperature=temperature,
                                share_prompt=True).logprobs.float().cpu()
        self.tokens_served += int(batch.attention_mask.sum())
        return [out[r, : len(y)].tolist() for r, y in enumerate(responses)]


def reference_app(model: torch.nn.Module, tokenizer: Any, *, model_name: str, token: str | None = None,
                  max_batch_tokens: int = 16384,
                  max_request_bytes: int = 32 << 20, pad_token_id: int | None = None) -> Any:
    """The FastAPI app of a reference server for ``model`` (already loaded, frozen)."""
    from fastapi import Request

    vocab = model_vocab_size(model)
    context = context_length(model)  # None: the model does not say; the forward then decides
    pad = pad_token_id if pad_token_id is not None else (getattr(tokenizer, "pad_token_id", None) or 0)
    batcher = LogprobBatcher(model, pad, max_batch_tokens)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    info = {"kind": "reference", "protocol": PROTOCOL_VERSION, "model": model_name, "vocab_size": vocab,
            "tokenizer_hash": tokenizer_hash(tokenizer), "dtype": dtype, "max_batch_tokens": max_batch_tokens,
            "context_length": context}

    @asynccontextmanager
    async def lifespan(_app: Any):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=False)

    app = make_app("reinforcepp reference", token, max_request_bytes, lifespan)
    app.state.batcher = batcher

    @app.get(INFO)
    async def get_info() -> dict:
        return {**info, "tokens_served": batcher.tokens_served}

    @app.post(LOGPROBS)
    async def logprobs(request: Request) -> Any:
        data = await read_json(request, max_request_bytes)
        prompts, responses = token_lists(data, "prompt_ids", vocab), token_lists(data, "response_ids", vocab)
        if len(prompts) != len(responses):
            raise BadRequest(422, f"{len(prompts)} prompt_ids rows but {len(responses)} response_ids rows")
        empty = [i for i, r in enumerate(responses) if not r]
        if empty:
            raise BadRequest(422, f"response_ids[{empty[0]}] is empty")
        longest = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=0)
        if longest > max_batch_tokens:
            raise BadRequest(422, f"a prompt + response of {longest} tokens > --max-batch-tokens={max_batch_tokens}")
        if context is not None and longest > context:
            row = next(i for i, (p, r) in enumerate(zip(prompts, responses)) if len(p) + len(r) == longest)
            raise BadRequest(422, f"row {row}: a prompt + response of {longest} tokens > the model's context of "
                                  f"{context} positions")
        temperature = data.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise BadRequest(422, f"temperature must be a number > 0, got {temperature!r}")
        if not prompts:
            return json_response({"logprobs": []})
        return json_response({"logprobs": await batcher.submit(prompts, responses, float(temperature))})

    return app
