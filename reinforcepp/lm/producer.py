"""Asynchronous rollouts: the engine generates the rollouts of steps t+1..t+N while the trainer
updates on step t (docs/algorithms.md, "Asynchronous rollouts: staleness and off-policy correction").

:class:`AsyncRollouts` runs a :class:`~.rollout.RolloutSampler` on a thread of its own, with an
engine that holds its own copy of the weights, and follows a fixed schedule so that a run is
exactly reproducible (and a resumed run equals the uninterrupted one):

* the rollout of step ``r`` is generated with policy version ``v_r = max(0, r - 1 - N)`` (the
  weights after update ``v_r``), so it is at most ``N`` versions old when step ``r`` trains on
  it (``N = async_rollouts``); while the trainer updates on step ``t`` the producer works on
  steps ``t+1 .. t+N``;
* with ``partial_rollouts`` each response is generated in ``N + 1`` segments; segment ``j`` of
  step ``r`` uses version ``min(r - 1, v_r + j)``, waiting for it: a generation in flight when
  the weights change continues under the new ones, the last segment on-policy;
* every engine call draws from its own seed (the run's seed, the rank, the step, the call), so
  nothing here touches the global generator the trainer uses;
* every token carries the version that sampled it (``Generation.token_versions``) and the
  log-probs it was sampled with (the behaviour policy of the off-policy correction).

After each update the trainer :meth:`publishes <AsyncRollouts.publish>` the new weights with
their version; the producer loads a version when its schedule reaches it (an engine that stages
versions itself, rollout servers, gets them at publish time and only switches then). A checkpoint
(:meth:`AsyncRollouts.checkpoint`) holds the loader position before the first rollout the trainer
has not consumed and every engine output since: on resume the producer replays those outputs,
then generates on, exactly as the uninterrupted run did.
"""

from __future__ import annotations

import copy
import math
import threading
import time
import warnings
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

import torch

from ..engines import Generation, GenerationEngine, SamplingParams, build_engine, can_stage, get_engine
from ..run.timer import PhaseTimer
from .config import LMConfig
from .rollout import Rollout, RolloutSampler

Weights = list[tuple[str, torch.Tensor]]


def call_seed(seed: int, rank: int, step: int, call: int) -> int:
    """A 63-bit seed for one engine call, from the run's seed, the rank, the step and the call
    index within the step's rollout (splitmix64 over the four)."""
    x = 0
    for part in (seed, rank, step, call):
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


class LockedScorer:
    """The reward scorer, called by one thread at a time (the producer's rollouts and the
    trainer's evaluations share it; remote clients and user functions need not be thread-safe)."""

    def __init__(self, scorer: Any, lock: threading.Lock) -> None:
        self.scorer, self.lock = scorer, lock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return self.scorer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scorer, name)


def generation_state(gen: Generation) -> dict[str, Any]:
    """An engine output as checkpoint data (engines never fill masks or episodes)."""
    return {"prompt_ids": gen.prompt_ids, "response_ids": gen.response_ids, "truncated": gen.truncated,
            "sampler_logprobs": gen.sampler_logprobs, "token_versions": gen.token_versions}


def generation_from_state(state: dict[str, Any]) -> Generation:
    return Generation([list(p) for p in state["prompt_ids"]], [list(r) for r in state["response_ids"]],
                      state["truncated"].bool(), state["sampler_logprobs"], None, None, state["token_versions"])


class _ProducerEngine:
    """The producer's view of its engine: each call gets its seed and the weight version the
    schedule gives it (or, on resume, the logged output), is logged, and with
    ``partial_rollouts`` is generated in segments."""

    def __init__(self, owner: AsyncRollouts, inner: GenerationEngine) -> None:
        self.owner, self.inner = owner, inner
        self.weight_version = -1  # the versions are the inner engine's, call by call

    def sync_weights(self, model: torch.nn.Module, weights: Any = None, *, version: int = 0) -> None:
        raise RuntimeError("the producer loads its weights itself (AsyncRollouts.publish)")

    def sleep(self) -> None:
        pass

    def generate(self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int,
                 params: SamplingParams) -> Generation:
        if not self.owner.partial:
            return self.owner.call(prompt_ids, samples_per_prompt, params)
        size = math.ceil(params.max_new_tokens / (self.owner.n + 1))
        gen = self.owner.call(prompt_ids, samples_per_prompt,
                              replace(params, max_new_tokens=min(size, params.max_new_tokens)))
        eos = self.owner.eos_ids
        while True:
            going = [i for i, r in enumerate(gen.response_ids) if r[-1] not in eos and len(r) < params.max_new_tokens]
            if not going:
                return gen
            self.owner.segment += 1
            # every unfinished response has the same length
            left = params.max_new_tokens - len(gen.response_ids[going[0]])
            more = self.owner.call([gen.prompt_ids[i] + gen.response_ids[i] for i in going], 1,
                                   replace(params, max_new_tokens=min(size, left)))
            gen = _extend(gen, going, more, params.max_new_tokens)


def _extend(gen: Generation, rows: list[int], more: Generation, max_new_tokens: int) -> Generation:
    """``gen`` with ``more``'s responses appended to its ``rows`` (log-probs and versions too)."""
    responses = [list(r) for r in gen.response_ids]
    logprobs = (None if gen.sampler_logprobs is None or more.sampler_logprobs is None
                else [list(x) for x in gen.sampler_logprobs])
    versions = (None if gen.token_versions is None or more.token_versions is None
                else [list(x) for x in gen.token_versions])
    for j, i in enumerate(rows):
        responses[i] += more.response_ids[j]
        if logprobs is not None and more.sampler_logprobs is not None:
            logprobs[i] += more.sampler_logprobs[j]
        if versions is not None and more.token_versions is not None:
            versions[i] += more.token_versions[j]
    truncated = gen.truncated.clone()
    truncated[rows] = more.truncated & torch.tensor([len(responses[i]) >= max_new_tokens for i in rows])
    return Generation(gen.prompt_ids, responses, truncated, logprobs, None, None, versions)


class AsyncRollouts:
    """The producer of an ``async_rollouts=N`` run (module docstring).

    Args:
        config: the run's config.
        sampler: a :class:`RolloutSampler` over ``engine`` (wrapped here), with its own tokenizer.
        engine: the producer's engine, holding its own copy of the weights (``model`` for the
            ``hf`` engines; its own, for engines registered with ``own_weights``).
        model: the weights the ``hf`` engines sample with (None for ``own_weights`` engines).
        loader: the training prompts (the producer draws them; the trainer does not).
        rank: this process's rank (each rank runs a producer for its prompts).
        start_step: the last step the trainer has done (0, or the resumed checkpoint's).
        saved: :meth:`checkpoint`'s state when resuming, else None.
    """

    def __init__(self, config: LMConfig, sampler: RolloutSampler, engine: GenerationEngine,
                 model: Optional[torch.nn.Module], loader: Any, *, rank: int, start_step: int,
                 saved: Optional[dict[str, Any]] = None) -> None:
        self.config, self.n, self.partial = config, config.async_rollouts, config.partial_rollouts
        self.engine, self.model, self.loader, self.rank = engine, model, loader, rank
        self.sampler = sampler
        self.sampler.engine = _ProducerEngine(self, engine)
        if self.sampler.episodes is not None:
            self.sampler.episodes.engine = self.sampler.engine
        eos = sampler.tokenizer.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else eos)
        self.cond = threading.Condition()
        self.published: dict[int, Weights] = {}
        self.done: dict[int, Rollout] = {}
        self.loader_before: dict[int, dict] = {}
        self.log: dict[int, list[Generation]] = {}
        self.replay: dict[int, list[Generation]] = {}
        self.error: Optional[BaseException] = None
        self.first, self.current, self.calls, self.segment = start_step + 1, start_step + 1, 0, 0
        self.pause_at: Optional[int] = None
        self.parked = self.finished = self.stopped = False
        self.idle = 0.0
        self.truncated_before: dict[int, int] = {}
        if saved is not None:
            loader.load_state_dict(saved["loader"])
            self.replay = {int(r): [generation_from_state(g) for g in gens] for r, gens in saved["log"].items()}
            sampler.prompts_truncated = int(saved.get("prompts_truncated", 0))
        self.thread = threading.Thread(target=self._run, name=f"reinforcepp-rollouts-{rank}", daemon=True)

    # ------------------------------------------------------------------ the trainer's side
    def start(self) -> None:
        self.thread.start()

    def publish(self, version: int, weights: Optional[Callable[[], Any]]) -> None:
        """Policy ``version`` (the weights after update ``version``): ``weights()`` copied now, or
        None when they equal the previous version's (every optimizer step was skipped). An
        engine that stages versions itself (rollout servers, :func:`~reinforcepp.engines.can_stage`)
        is handed them instead, and no copy is kept here."""
        if can_stage(self.engine):
            self.engine.stage_weights(weights, version=version)
            snapshot: Weights = []  # a marker: the engine holds the version
        elif weights is not None:
            snapshot = [(n, t.detach().clone()) for n, t in weights()]
        else:
            with self.cond:
                snapshot = self.published[version - 1]
        with self.cond:
            self.published[version] = snapshot
            oldest = self.start_version(self.current)  # no rollout from the current one on needs an older version
            for v in [v for v in self.published if v < oldest and v != version]:
                del self.published[v]
            self.cond.notify_all()

    def next(self, step: int) -> Rollout:
        """The rollout of ``step`` (waits for it; a failure of the producer is raised here)."""
        with self.cond:
            while step not in self.done:
                self._raise_error()
                if self.finished:
                    raise RuntimeError(f"the rollout producer stopped before step {step}")
                self.cond.wait(0.5)
            for r in [r for r in self.loader_before if r <= step]:
                del self.loader_before[r]
                self.log.pop(r, None)
            return self.done.pop(step)

    def checkpoint(self, step: int) -> dict[str, Any]:
        """What resumes the producer exactly after ``step``: pauses it at its first engine call
        that needs version ``step`` or newer (the calls that need older weights, which the
        checkpoint does not hold, are done and logged by then), takes the loader position before
        rollout ``step + 1`` and every engine output since, and lets it go on."""
        with self.cond:
            self.pause_at = step
            self.cond.notify_all()
            while not (self.parked or self.finished):
                self._raise_error()
                self.cond.wait(0.5)
            state = {"loader": self.loader_before.get(step + 1, self.loader.state_dict()),
                     "log": {str(r): [generation_state(g) for g in gens] for r, gens in self.log.items() if r > step},
                     "prompts_truncated": self.truncated_before.get(step + 1, self.sampler.prompts_truncated)}
            self.pause_at = None
            self.cond.notify_all()
        return state

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=60)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    # ------------------------------------------------------------------ the producer's side
    def start_version(self, step: int) -> int:
        """``v_r``: the version the rollout of ``step`` starts with."""
        return max(0, step - 1 - self.n)

    def _run(self) -> None:
        timer = self.sampler.timer
        try:
            for r in range(self.first, self.config.total_steps + 1):
                with self.cond:
                    self.current, self.calls, self.segment, self.idle = r, 0, 0, 0.0
                    self.loader_before[r] = copy.deepcopy(self.loader.state_dict())
                    self.truncated_before[r] = self.sampler.prompts_truncated
                    self.log[r] = []
                rollout = self.sampler.rollout(self.loader.next_batch, r)
                times = timer.pop()
                rollout.counts.update({"producer/generate_s": times.get("time/generate", 0.0),
                                       "producer/score_s": times.get("time/score", 0.0), "producer/idle_s": self.idle})
                with self.cond:
                    self.done[r] = rollout
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread, which raises it
            with self.cond:
                self.error = e if not self.stopped else None
                self.cond.notify_all()
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def call(self, prompt_ids: Sequence[Sequence[int]], k: int, params: SamplingParams) -> Generation:
        """One engine call of the current rollout: replayed from the checkpoint's log, or
        generated live with its seed and scheduled version; logged either way."""
        r = self.current
        index = self.calls
        self.calls += 1
        gen = self._replayed(r, prompt_ids, k)
        if gen is None:
            version = min(r - 1, self.start_version(r) + self.segment) if self.partial else self.start_version(r)
            version = self._wait_and_load(version)
            seeded = replace(params, seed=call_seed(self.config.seed, self.rank, r, index))
            gen = self.engine.generate(prompt_ids, k, seeded)
            if gen.token_versions is None:  # an engine that does not stamp its samples
                gen.with_version(version)
        with self.cond:
            self.log.setdefault(r, []).append(gen)
        return gen

    def _replayed(self, r: int, prompt_ids: Sequence[Sequence[int]], k: int) -> Optional[Generation]:
        logged = self.replay.get(r)
        if not logged:
            return None
        gen = logged.pop(0)
        if gen.prompt_ids != [list(p) for p in prompt_ids for _ in range(k)]:
            warnings.warn(f"resume: step {r}'s rollout did not replay as logged (an environment or reward that is not "
                          "deterministic?); generating the rest anew with the checkpoint's weights", stacklevel=2)
            self.replay.clear()
            return None
        return gen

    def _wait_and_load(self, version: int) -> int:
        """Wait until ``version`` is published and no checkpoint holds the producer here, then
        load it (a version pruned away, after a resume that could not replay: the oldest kept);
        returns the version loaded."""
        start = time.perf_counter()
        with self.cond:
            while True:
                if self.stopped:
                    raise SystemExit("the rollout producer was stopped")
                hold = self.pause_at is not None and version >= self.pause_at
                available = version in self.published or (self.published and version < min(self.published))
                self.parked = hold or not available
                if not self.parked:
                    break
                self.cond.notify_all()
                self.cond.wait(0.5)
            self.parked = False
            if version not in self.published:
                version = min(self.published)
            weights = self.published[version]
        self.idle += time.perf_counter() - start
        if self.engine.weight_version != version:
            self._load(version, weights)
        return version

    def _load(self, version: int, weights: Weights) -> None:
        if can_stage(self.engine):  # staged at publish time: only switch
            self.engine.use_version(version)
            return
        if self.model is None:  # an engine with its own copy of the weights (vLLM) loads them itself
            self.engine.sync_weights(torch.nn.Module(), lambda: weights, version=version)
            return
        copy_weights(self.model, weights)
        self.engine.sync_weights(self.model, version=version)


def copy_weights(model: torch.nn.Module, weights: Any) -> None:
    """Copy ``(name, tensor)`` pairs (Hugging Face names; a tied weight may come under either of
    its names) into ``model``'s parameters and persistent buffers, in place."""
    mine = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in weights:
            if name not in mine:
                raise KeyError(f"the producer's model has no weight {name!r}")
            mine[name].copy_(tensor)


def build_producer(config: LMConfig, rt: Any, models: Any, engine: GenerationEngine, scorer: Any, env_factory: Any,
                   spec: Any, loader: Any, start_step: int,
                   saved: Optional[dict[str, Any]]) -> tuple[AsyncRollouts, GenerationEngine, Any]:
    """The producer (with its own engine, weights, tokenizer and sampler), the engine the
    trainer keeps for evaluation (``hf`` on the policy itself: always the current weights) and
    the scorer both share under a lock."""
    tokenizer = copy.deepcopy(models.tokenizer)  # fast tokenizers must not be used by two threads at once
    locked = LockedScorer(scorer, threading.Lock()) if scorer is not None else None
    if get_engine(config.engine).own_weights:
        trainer_engine = build_engine("hf", models.policy, models.tokenizer, rt.device, config)
        producer_engine, model = engine, None
    else:
        model = _plain_copy(models, rt, config.trust_remote_code)
        producer_engine, trainer_engine = build_engine(config.engine, model, tokenizer, rt.device, config), engine
    sampler = RolloutSampler(config, rt, producer_engine, model if model is not None else models.policy, tokenizer,
                             locked, env_factory, spec, timer=PhaseTimer())
    producer = AsyncRollouts(config, sampler, producer_engine, model, loader, rank=rt.dist.rank, start_step=start_step,
                             saved=saved)
    return producer, trainer_engine, locked


def _plain_copy(models: Any, rt: Any, trust_remote_code: bool) -> torch.nn.Module:
    """An unsharded, adapter-free copy of the policy for the producer's ``hf`` engine: the
    policy itself deep-copied when it is plain, else built from its config and given the full
    (gathered, LoRA-merged) weights."""
    policy = models.policy
    if not models.lora and not rt.parallel.sharded:
        model = copy.deepcopy(policy)
    else:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):  # its random initialisation is overwritten; the trainer's stream stays
            model = AutoModelForCausalLM.from_config(policy.config, trust_remote_code=trust_remote_code)
        model.to(device=rt.device, dtype=rt.dtype)
        copy_weights(model, models.weights())
    model.eval()
    model.requires_grad_(False)
    return model
