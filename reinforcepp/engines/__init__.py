"""Generation engines: the seam between the trainers and whatever samples the responses.

* :mod:`.base` -- the shared types: :class:`SamplingParams`, :class:`Generation`,
  :class:`EpisodeInfo`, the :class:`GenerationEngine` protocol, :data:`WeightProvider`;
* :mod:`.registry` -- engines by name, each with its options and checks
  (:func:`register_engine`, :func:`build_engine`);
* :mod:`.hf` -- ``hf`` (the default, :class:`SharedPromptSampler`) and ``hf_generate``;
* :mod:`.vllm` -- ``vllm`` (vLLM's offline engine; vLLM itself is imported only when used);
* :mod:`.remote` -- ``remote`` (rollout servers, ``rollout_urls``; the HTTP client is
  :mod:`reinforcepp.remote`).

This room imports only the lower floors of the package (``config``, ``errors``, ``remote``); the trainers
(``reinforcepp.lm``) and the multi-turn rollouts (``reinforcepp.agents``) import it, never the
reverse. docs/architecture.md shows how to add an engine.
"""

from .base import (
    EpisodeInfo,
    Generation,
    GenerationEngine,
    SamplingParams,
    StagingEngine,
    WeightProvider,
    can_stage,
    full_weights,
    left_pad,
    position_ids_from_mask,
    prompt_seed,
    split_responses,
)
from .registry import ENGINES, EngineSpec, build_engine, check_engine_config, get_engine, register_engine
from .hf import HFGenerationEngine, SharedPromptSampler, filter_logits  # registers hf, hf_generate
from . import vllm as _vllm  # registers vllm (vLLM is imported only when the engine is built)
from . import remote as _remote  # registers remote (rollout servers; httpx is imported only when the engine is built)

__all__ = [
    "ENGINES", "EngineSpec", "EpisodeInfo", "Generation", "GenerationEngine", "HFGenerationEngine", "SamplingParams",
    "SharedPromptSampler", "StagingEngine", "WeightProvider", "build_engine", "can_stage", "check_engine_config",
    "filter_logits", "full_weights", "get_engine", "left_pad", "position_ids_from_mask", "prompt_seed",
    "register_engine", "split_responses",
]
del _vllm, _remote
