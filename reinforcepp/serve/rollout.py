"""``reinforcepp serve rollout``: generation on a machine of its own, with versioned weights.

The server samples with an engine of this package (``hf``: :class:`~reinforcepp.engines.SharedPromptSampler`;
``vllm``: :class:`~reinforcepp.engines.vllm.VLLMEngine`), so its samples, seeds and log-probs are
the local engine's. The trainer pushes each new version of the weights (``POST /weights`` in
checksummed safetensors chunks, then ``POST /weights/commit``); the server *holds* up to
``keep_versions`` versions beside the one it samples with (the *active* one), so a trainer can
push right after each update while an asynchronous producer still asks for an older version.
Every ``/generate`` names the weight version it needs: a held version is activated (copied into
the engine) before it runs, and a version the server does not hold is refused with HTTP 409 and
the versions it holds, never served with other weights.

Versions belong to a *run* (an id the trainer draws at start): a commit drops every other run's
versions and the run's versions above the committed one (a resumed run rewrites its future), and
a request must name the run. Concurrent requests for the same version and sampling settings are
generated together (up to ``max_batch_prompts`` prompts); seeds are per prompt, so batching never
changes a sample. Protocol: :mod:`reinforcepp.remote.protocol` and docs/remote.md.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime.
import asyncio
import hashlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, TypeGuard

import torch

from ..engines import Generation, SamplingParams
from ..remote.protocol import (
    FINISH_LENGTH,
    FINISH_STOP,
    GENERATE,
    INFO,
    PROTOCOL_VERSION,
    VERSION_NOT_HELD,
    WEIGHTS,
    WEIGHTS_COMMIT,
    model_vocab_size,
    tokenizer_hash,
)
from ..remote.weights import read_piece, sha256
from .app import BadRequest, json_response, make_app, read_body, read_json, token_lists

Weights = dict[str, torch.Tensor]


class Backend:
    """What the server needs of an engine: sampling, and loading a version's weights.

    Args:
        model: the Hugging Face model the server was started with (its names, shapes and
            dtype are what a push must match).
        sample: ``(prompt_ids, k, params) -> Generation``.
        load: makes ``{name: tensor}`` (a whole set of weights) the ones sampled with.
    """

    def __init__(
        self, name: str, model: torch.nn.Module, sample: Callable[..., Generation], load: Callable[[Weights], None]
    ) -> None:
        self.name, self.model, self.sample, self.load = name, model, sample, load
        state = model.state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtype = next(model.parameters()).dtype
        groups: dict[int, list[str]] = {}
        for k, v in state.items():  # tied weights share storage: either name covers both
            groups.setdefault(v.data_ptr(), []).append(k)
        self.groups = list(groups.values())

    def missing(self, tensors: Weights) -> Optional[str]:
        """The first weight a push left out (None when every one is there)."""
        for names in self.groups:
            if not any(n in tensors for n in names):
                return names[0]
        return None


def hf_backend(model: torch.nn.Module, tokenizer: Any, device: torch.device) -> Backend:
    """The ``hf`` engine (:class:`SharedPromptSampler`) on ``model``; loads copy into it in place."""
    from ..engines import SharedPromptSampler

    engine = SharedPromptSampler(model, tokenizer, device=device)
    mine = model.state_dict(keep_vars=True)

    def load(tensors: Weights) -> None:
        with torch.no_grad():
            for name, t in tensors.items():
                mine[name].copy_(t)

    return Backend("hf", model, engine.generate, load)


def vllm_backend(
    model: torch.nn.Module, tokenizer: Any, device: torch.device, gpu_memory_utilization: float, seed: int
) -> Backend:
    """The ``vllm`` engine built from ``model`` (its config and weights); loads go through
    vLLM's ``load_weights`` (:meth:`VLLMEngine.sync_weights`)."""
    from types import SimpleNamespace

    from ..engines.vllm import VLLMEngine

    settings = SimpleNamespace(
        vllm_gpu_memory_utilization=gpu_memory_utilization, vllm_sleep=False, seed=seed, trust_remote_code=False
    )
    engine = VLLMEngine(model, tokenizer, device=device, config=settings)

    def load(tensors: Weights) -> None:
        engine.sync_weights(torch.nn.Module(), lambda: list(tensors.items()))

    return Backend("vllm", model, engine.generate, load)


@dataclass
class Upload:
    """A push in progress: its chunks so far, the piece being assembled, the tensors read."""

    run: str
    version: int
    chunks: int = 0
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    piece: bytearray = field(default_factory=bytearray)
    tensors: Weights = field(default_factory=dict)


@dataclass
class Job:
    prompts: list[list[int]]
    k: int
    params: SamplingParams
    seeds: Optional[list[int]]
    run: str
    version: int
    future: asyncio.Future

    @property
    def key(self) -> tuple:
        """Jobs with the same key are generated by one engine call."""
        return (self.run, self.version, self.k, self.params, self.seeds is None)


class RolloutService:
    """The state of a rollout server: held versions, the active one, the upload, the queue."""

    def __init__(self, backend: Backend, *, keep_versions: int = 3, max_batch_prompts: int = 256) -> None:
        if keep_versions < 1 or max_batch_prompts < 1:
            raise ValueError(
                f"need keep_versions >= 1 and max_batch_prompts >= 1, got {keep_versions}, {max_batch_prompts}"
            )
        self.backend, self.keep, self.max_batch_prompts = backend, keep_versions, max_batch_prompts
        self.held: dict[int, Weights] = {}
        self.run: Optional[str] = None
        """the run the held versions belong to (None: no run has pushed yet; the engine holds the
        weights the server started with, version 0 of no run, which no request can name)"""
        self.active: Optional[int] = 0
        """the version the engine holds now (None: none of the held ones, after a commit replaced it)"""
        self.upload: Optional[Upload] = None
        self.served: dict[int, int] = {}
        self.tokens_generated = 0
        self.lock = threading.Lock()  # the held versions and the active one, between the threads
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-generate")
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-weights")

    def holds(self, run: Optional[str], version: int) -> bool:
        with self.lock:
            return run == self.run and (version in self.held or version == self.active)

    def versions(self) -> list[int]:
        with self.lock:
            return sorted(set(self.held) | ({self.active} if self.active is not None else set()))

    # ------------------------------------------------------------------ weights
    def chunk(self, run: str, version: int, index: int, end: bool, digest: str, data: bytes) -> None:
        """One chunk of a push (chunk 0 starts it anew); a piece is read when its last chunk arrives."""
        if sha256(data) != digest:
            self.upload = None
            raise BadRequest(
                422, f"chunk {index} of weight version {version}: its sha256 does not match: push again from chunk 0"
            )
        up = self.upload
        if index == 0:
            up = self.upload = Upload(run, version)
        elif up is None or (up.run, up.version) != (run, version) or up.chunks != index:
            expected = "chunk 0" if up is None else f"chunk {up.chunks} of version {up.version}"
            self.upload = None
            raise BadRequest(
                422, f"chunk {index} of weight version {version} arrived, expected {expected}: push again from chunk 0"
            )
        assert up is not None
        up.chunks, up.size = up.chunks + 1, up.size + len(data)
        up.digest.update(data)
        up.piece.extend(data)
        if end:
            piece, up.piece = bytes(up.piece), bytearray()
            try:
                tensors = read_piece(piece)
            except ValueError as exc:
                self.upload = None
                raise BadRequest(422, str(exc)) from None
            for name, t in tensors.items():
                if name not in self.backend.shapes:
                    self.upload = None
                    raise BadRequest(
                        422, f"weight {name!r} is not a weight of this server's model ({self.backend.name})"
                    )
                if tuple(t.shape) != self.backend.shapes[name]:
                    self.upload = None
                    raise BadRequest(
                        422,
                        f"weight {name!r} has shape {list(t.shape)}, "
                        f"this server's model {list(self.backend.shapes[name])}",
                    )
                if name in up.tensors:
                    self.upload = None
                    raise BadRequest(422, f"weight {name!r} was pushed twice")
                up.tensors[name] = t.to(self.backend.dtype) if t.is_floating_point() else t

    def commit(self, data: dict) -> dict:
        """The end of a push (or an alias: ``same_as``): the version is held from now on."""
        run, version = data.get("run"), data.get("version")
        if not isinstance(run, str) or not run or not _is_int(version) or version < 0:
            raise BadRequest(422, "a commit needs 'run' (a string) and 'version' (an integer >= 0)")
        if "same_as" in data:
            same = data["same_as"]
            with self.lock:
                tensors = self.held.get(same) if run == self.run and _is_int(same) else None
            if tensors is None:
                raise BadRequest(
                    VERSION_NOT_HELD,
                    f"weight version {same!r} of run {run} is not held here; push the weights",
                    versions=self.versions() if run == self.run else [],
                    run=self.run,
                )
        else:
            up = self.upload
            if up is None or (up.run, up.version) != (run, version):
                raise BadRequest(422, f"no push of weight version {version} of run {run} in progress")
            self.upload = None
            if (up.chunks, up.size, up.digest.hexdigest()) != (
                data.get("chunks"),
                data.get("bytes"),
                data.get("sha256"),
            ):
                raise BadRequest(
                    422,
                    f"weight version {version}: received {up.chunks} chunks, {up.size} bytes, sha256 "
                    f"{up.digest.hexdigest()[:16]}..., the commit says {data.get('chunks')}, {data.get('bytes')}, "
                    f"{str(data.get('sha256'))[:16]}...: push again",
                )
            if up.piece:
                raise BadRequest(422, f"weight version {version}: the last piece was not finished (end=1 missing)")
            lacking = self.backend.missing(up.tensors)
            if lacking is not None:
                raise BadRequest(422, f"weight version {version} lacks weight {lacking!r}")
            tensors = up.tensors
        with self.lock:
            if run != self.run:
                self.held, self.run, self.active = {}, run, None
            for v in [v for v in self.held if v >= version]:
                del self.held[v]
            if self.active is not None and self.active >= version:
                self.active = None  # the engine holds a version this commit replaced (or a future it dropped)
            self.held[version] = tensors
            for v in sorted(self.held)[: max(0, len(self.held) - self.keep)]:
                del self.held[v]
            active = self.active
        return {"run": run, "versions": self.versions(), "weight_version": active}

    # ------------------------------------------------------------------ generation
    async def run_queue(self) -> None:
        """Takes every queued job, generates each group of compatible ones together."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            while not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            for group in _groups(jobs, self.max_batch_prompts):
                live = [j for j in group if not j.future.done()]
                if not live:
                    continue
                try:
                    gen = await loop.run_in_executor(self.worker, self.generate, live)
                except Exception as exc:  # noqa: BLE001 - every waiting request hears it (a 409 too)
                    for j in live:
                        if not j.future.done():
                            j.future.set_exception(exc)
                    continue
                start = 0
                for j in live:
                    n = len(j.prompts) * j.k
                    if not j.future.done():
                        j.future.set_result(gen.take(range(start, start + n)))
                    start += n

    def generate(self, jobs: list[Job]) -> Generation:
        """On the worker thread: activate the jobs' version if the engine holds another one (a
        version dropped while they waited is refused), then one engine call for all of them."""
        first = jobs[0]
        with self.lock:
            if not (first.run == self.run and first.version == self.active):
                tensors = self.held.get(first.version) if first.run == self.run else None
                if tensors is None:
                    raise self.not_held(first.run, first.version, locked=True)
                self.backend.load(tensors)
                self.active = first.version
        prompts = [p for j in jobs for p in j.prompts]
        seeds = None if first.seeds is None else tuple(s for j in jobs for s in (j.seeds or []))
        gen = self.backend.sample(prompts, first.k, replace(first.params, prompt_seeds=seeds))
        self.served[first.version] = self.served.get(first.version, 0) + len(gen)
        self.tokens_generated += sum(len(r) for r in gen.response_ids)
        return gen

    def not_held(self, run: Optional[str], version: Any, locked: bool = False) -> BadRequest:
        active = set() if self.active is None else {self.active}
        held = (sorted(set(self.held) | active) if locked else self.versions()) if run == self.run else []
        return BadRequest(
            VERSION_NOT_HELD,
            f"this rollout server holds weight versions {held} of run {self.run}, not version {version} of run {run}",
            versions=held,
            run=self.run,
        )


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _groups(jobs: list, limit: int) -> list[list]:
    """Jobs with the same key, in arrival order, in groups of at most ``limit`` prompts (a
    larger job alone)."""
    by_key: dict[tuple, list[list]] = {}
    for job in jobs:
        groups = by_key.setdefault(job.key, [[]])
        if groups[-1] and sum(len(j.prompts) for j in groups[-1]) + len(job.prompts) > limit:
            groups.append([])
        groups[-1].append(job)
    return [g for gs in by_key.values() for g in gs]


def _sampling(data: dict, vocab: int) -> tuple[list[list[int]], int, SamplingParams, Optional[list[int]], str, int]:
    """A ``/generate`` request, checked: prompts, k, params, seeds, run, version."""
    prompts = token_lists(data, "prompt_ids", vocab)
    if not prompts or any(not p for p in prompts):
        raise BadRequest(422, "prompt_ids must hold at least one prompt, none empty")
    k, n = data.get("samples_per_prompt", 1), data.get("max_new_tokens")
    if not _is_int(k) or k < 1 or not _is_int(n) or n < 1:
        raise BadRequest(422, f"samples_per_prompt and max_new_tokens must be integers >= 1, got {k!r}, {n!r}")
    greedy = data.get("greedy", False)
    temperature, top_p, top_k = data.get("temperature", 1.0), data.get("top_p", 1.0), data.get("top_k", 0)
    if not isinstance(greedy, bool):
        raise BadRequest(422, f"greedy must be true or false, got {greedy!r}")
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or not temperature > 0
    ):
        raise BadRequest(422, f"temperature must be a number > 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise BadRequest(422, f"top_p must be in (0, 1], got {top_p!r}")
    if not _is_int(top_k) or top_k < 0:
        raise BadRequest(422, f"top_k must be an integer >= 0, got {top_k!r}")
    seeds = data.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list) or len(seeds) != len(prompts) or not all(_is_int(s) and s >= 0 for s in seeds)
    ):
        raise BadRequest(422, f"seeds must be null or {len(prompts)} integers >= 0 (one per prompt)")
    run, version = data.get("run"), data.get("weight_version")
    if not isinstance(run, str) or not _is_int(version):
        raise BadRequest(422, "a request needs 'run' (a string) and 'weight_version' (an integer)")
    params = SamplingParams(n, float(temperature), float(top_p), top_k, greedy)
    return prompts, k, params, seeds, run, version


def rollout_app(
    backend: Backend,
    tokenizer: Any,
    *,
    model_name: str,
    eos_token_ids: list[int],
    token: Optional[str] = None,
    keep_versions: int = 3,
    max_batch_prompts: int = 256,
    max_request_bytes: int = 32 << 20,
) -> Any:
    """The FastAPI app of a rollout server sampling with ``backend``."""
    from fastapi import Request

    service = RolloutService(backend, keep_versions=keep_versions, max_batch_prompts=max_batch_prompts)
    vocab = model_vocab_size(backend.model)
    info = {
        "kind": "rollout",
        "protocol": PROTOCOL_VERSION,
        "model": model_name,
        "engine": backend.name,
        "vocab_size": vocab,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "eos_token_ids": eos_token_ids,
        "dtype": str(backend.dtype).removeprefix("torch."),
        "keep_versions": keep_versions,
        "max_batch_prompts": max_batch_prompts,
        "max_request_bytes": max_request_bytes,
    }

    @asynccontextmanager
    async def lifespan(_app: Any):
        task = asyncio.create_task(service.run_queue())
        yield
        task.cancel()
        service.worker.shutdown(wait=False)
        service.reader.shutdown(wait=False)

    app = make_app("reinforcepp rollout", token, max_request_bytes, lifespan)
    app.state.service = service

    @app.get(INFO)
    async def get_info() -> dict:
        return {
            **info,
            "run": service.run,
            "weight_version": service.active,
            "versions": service.versions(),
            "served": {str(v): n for v, n in sorted(service.served.items())},
            "tokens_generated": service.tokens_generated,
        }

    @app.post(GENERATE)
    async def generate(request: Request) -> Any:
        data = await read_json(request, max_request_bytes)
        prompts, k, params, seeds, run, version = _sampling(data, vocab)
        if not service.holds(run, version):
            raise service.not_held(run, version)
        future = asyncio.get_running_loop().create_future()
        job = Job(prompts, k, params, seeds, run, version, future)
        started = time.perf_counter()
        await service.queue.put(job)
        gen: Generation = await future
        truncated = gen.truncated.tolist()
        return json_response(
            {
                "response_ids": gen.response_ids,
                "logprobs": gen.sampler_logprobs,
                "truncated": truncated,
                "finish_reasons": [FINISH_LENGTH if t else FINISH_STOP for t in truncated],
                "weight_version": version,
                "seconds": time.perf_counter() - started,
            }
        )

    @app.post(WEIGHTS)
    async def weights(request: Request, run: str, version: int, chunk: int, end: int, sha256: str) -> Any:
        data = await read_body(request, max_request_bytes)
        if version < 0 or chunk < 0 or end not in (0, 1) or not run:
            raise BadRequest(422, "need run, version >= 0, chunk >= 0 and end in {0, 1}")
        await asyncio.get_running_loop().run_in_executor(
            service.reader, service.chunk, run, version, chunk, bool(end), sha256, data
        )
        return {"chunk": chunk}

    @app.post(WEIGHTS_COMMIT)
    async def commit(request: Request) -> Any:
        data = await read_json(request, max_request_bytes)
        return await asyncio.get_running_loop().run_in_executor(service.reader, service.commit, data)

    return app
