"""``engine=remote`` (selected by ``rollout_urls``): generation on rollout servers.

The servers are ``reinforcepp serve rollout`` processes (or plain ``vllm serve`` ones, as
``vllm+http://...``) on machines of their own (:mod:`reinforcepp.remote.rollout`, docs/remote.md).
The engine holds no weights: it sends token ids and gets back tokens, the log-probs they were
sampled with and the weight version that sampled them, and it pushes every new version of the
policy's weights to the servers:

* ``sync_weights(model, weights, version=v)`` pushes version ``v`` and samples with it from now
  on; ``stage_weights(weights, version=v)`` only pushes it (asynchronous rollouts stage each
  version at publish time, the producer's load then only switches: :data:`~.base.StagingEngine`);
* under ``torchrun`` every rank iterates the weight provider (under FSDP each tensor is gathered
  collectively, one at a time) and rank 0 alone sends; the ranks then meet at a barrier, so no
  rank asks for a version before the servers hold it;
* the servers hold the versions of this *run* (an id rank 0 draws at start), so a resumed run, or
  another one, is never served weights it did not push.

Seeds: every call is seeded (by ``SamplingParams.seed``, or by a seed drawn from torch's
generator, so that a seeded run repeats and resumes exactly); prompt ``i`` gets
:func:`~.base.prompt_seed` ``(seed, i)``, so how the call is split over the servers does not
change a sample, and the samples are the local ``hf`` (or ``vllm``) engine's.
"""

from __future__ import annotations

import uuid
from typing import Any, Optional, Sequence

import torch

from ..config import ConfigError
from ..remote import read_token, settings_from
from ..remote.client import RemoteError
from ..remote.protocol import model_vocab_size, tokenizer_hash
from ..remote.rollout import RolloutPool
from ..remote.rollout_server import Expected, check_rollout_url, needs_token
from .base import Generation, SamplingParams, WeightProvider, full_weights, prompt_seed
from .registry import register_engine


class RemoteEngine:
    """Samples on the rollout servers of ``config.rollout_urls`` (module docstring).

    Args:
        model, tokenizer: the policy (its vocabulary size) and its tokenizer (hash, EOS ids),
            which every server must share.
        config: the trainer's config (``rollout_urls``, ``rollout_timeout``, the ``remote_*`` keys,
            ``async_rollouts``).
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, *, device: torch.device | str = "cpu", config: Any = None
    ) -> None:
        self.pool = RolloutPool(list(config.rollout_urls), settings_from(config), timeout=float(config.rollout_timeout))
        self.rank, self.world = _ranks()
        self.pool.run = _run_id(self.world)
        eos = tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pool.connect(
            Expected(
                model_vocab_size(model),
                tokenizer_hash(tokenizer),
                tuple(self.eos_ids),
                int(getattr(config, "async_rollouts", 0)) + 1,
                lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
            )
        )
        self.weight_version = 0
        self.staged: Optional[int] = None
        """the newest version pushed (None: none yet; the servers hold only what they started with)"""

    # ------------------------------------------------------------------ weights
    def stage_weights(self, weights: Optional[WeightProvider], *, version: int) -> None:
        """Push version ``version``: ``weights()``, or (None) the weights of the newest version
        pushed. Collective under torchrun: every rank calls it in the same order."""
        from contextlib import nullcontext

        if weights is None and self.staged is None:
            raise RuntimeError("the rollout servers hold no weights of this run yet: push them first")
        exclusive = self.pool.exclusive_vllm() if self.pool.has_vllm else nullcontext()
        with exclusive:
            if self.pool.has_vllm:
                _barrier(self.world)  # no rank has a request on a vLLM server while it loads
            failure: Optional[RemoteError] = None
            try:
                self.pool.push(
                    version, None if weights is None else weights(), same_as=self.staged, send=self.rank == 0
                )
            except RemoteError as exc:
                failure = exc
            _barrier(self.world)  # the servers hold it before any rank asks for it
        if failure is not None:
            raise failure
        self.staged = version

    def use_version(self, version: int) -> None:
        """Sample with ``version`` (pushed by :meth:`stage_weights`) from now on."""
        self.weight_version = version

    def sync_weights(
        self, model: torch.nn.Module, weights: Optional[WeightProvider] = None, *, version: int = 0
    ) -> None:
        self.stage_weights(weights or full_weights(model), version=version)
        self.use_version(version)

    def sleep(self) -> None:
        pass

    # ------------------------------------------------------------------ sampling
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams
    ) -> Generation:
        if self.staged is None:
            raise RuntimeError("engine=remote: no weights pushed yet (sync_weights or stage_weights first)")
        prompts = [list(p) for p in prompt_ids]
        seeds = params.seeds_for(len(prompts))
        if seeds is None and not params.greedy:  # drawn here: a seeded run repeats, and resumes, exactly
            call = int(torch.randint(0, 2**62, ()))
            seeds = [prompt_seed(call, i) for i in range(len(prompts))]
        sampling = {
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "greedy": params.greedy,
        }
        rows = self.pool.generate(
            prompts, samples_per_prompt, sampling, None if params.greedy else seeds, self.weight_version
        )
        prompt_rows = [p for p in prompts for _ in range(samples_per_prompt)]
        versions = [[v] * len(r) for v, r in zip(rows.versions, rows.response_ids)]
        return Generation(
            prompt_rows,
            rows.response_ids,
            torch.tensor(rows.truncated, dtype=torch.bool),
            rows.logprobs,
            token_versions=versions,
        )

    def close(self) -> None:
        self.pool.close()


def _ranks() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _run_id(world: int) -> str:
    """A random id of this training run's launch, the same on every rank (rank 0's)."""
    run = [uuid.uuid4().hex[:16]]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(run, src=0)
    return str(run[0])


def check_remote_config(config: Any) -> None:
    """``rollout_urls``, before any model loads: URLs, a token for servers on other machines."""
    urls = list(config.rollout_urls)
    if not urls:
        raise ConfigError(
            "engine=remote samples on rollout servers: set rollout_urls=http://HOST:PORT[,http://HOST2:PORT] "
            "(`reinforcepp serve rollout` on each)"
        )
    for url in urls:
        try:
            check_rollout_url(url)
        except RemoteError as exc:
            raise ConfigError(str(exc)) from None
    if len(set(urls)) != len(urls):
        raise ConfigError(f"rollout_urls names a server twice: {', '.join(u for u in urls if urls.count(u) > 1)}")
    if not config.rollout_timeout > 0:
        raise ConfigError(f"rollout_timeout must be > 0 seconds, got {config.rollout_timeout}")
    try:
        token = read_token(config.remote_token_file)
    except RemoteError as exc:
        raise ConfigError(str(exc)) from None
    far = [u for u in urls if needs_token(u)]
    if far and not token:
        raise ConfigError(
            f"rollout server {far[0]} is on another machine and needs a token: give it in remote_token_file "
            "or REINFORCEPP_REMOTE_TOKEN (the server's --token-file; vLLM's --api-key)"
        )


def _build(
    model: torch.nn.Module, tokenizer: Any, *, device: torch.device | str = "cpu", config: Any = None
) -> RemoteEngine:
    return RemoteEngine(model, tokenizer, device=device, config=config)


register_engine(
    "remote",
    _build,
    help="rollout servers (`reinforcepp serve rollout`, or vllm+http:// for a plain `vllm serve`): "
    "set rollout_urls, which selects it",
    options=("rollout_urls", "rollout_timeout"),
    check=check_remote_config,
    own_weights=True,
)
