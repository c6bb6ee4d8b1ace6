"""The engine registry: each engine declares itself, its options and its checks, in one place.

A new engine is one module and one :func:`register_engine` call (docs/architecture.md shows an
example)::

    register_engine("my_engine", MyEngine, help="...", options=("my_engine_batch",), check=check_my_engine)

* ``build(model, tokenizer, *, device, config)`` returns a :class:`~.base.GenerationEngine`;
* ``options`` are the trainer's config keys the engine owns (``vllm_gpu_memory_utilization``,
  ...): setting one while another engine runs is refused in one line;
* ``check(config)`` refuses what the engine cannot do, before any model loads;
* ``logprobs``: whether it reports the log-probs it sampled with (off-policy corrections need them);
* ``seeded``: whether it honours ``SamplingParams.seed`` (asynchronous rollouts need it: their
  draws must not touch the global generator the trainer uses);
* ``own_weights``: whether it holds a copy of the weights of its own (``sync_weights`` then copies),
  instead of sampling with the training model.

The trainer's config is passed duck-typed (any object with the keys), so this room never
imports the trainers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..config import ConfigError
from .base import GenerationEngine


@dataclass(frozen=True)
class EngineSpec:
    name: str
    build: Callable[..., GenerationEngine]
    help: str = ""
    options: tuple[str, ...] = ()
    check: Optional[Callable[[Any], None]] = None
    logprobs: bool = True
    own_weights: bool = False
    seeded: bool = True


ENGINES: dict[str, EngineSpec] = {}


def register_engine(name: str, build: Callable[..., GenerationEngine], *, help: str = "", options: tuple[str, ...] = (),
                    check: Optional[Callable[[Any], None]] = None, logprobs: bool = True, own_weights: bool = False,
                    seeded: bool = True) -> EngineSpec:
    """Register ``build(model, tokenizer, *, device, config) -> GenerationEngine`` under ``name``
    (``config`` is the trainer's config); see the module docstring for the other fields."""
    spec = EngineSpec(name, build, help, tuple(options), check, logprobs, own_weights, seeded)
    ENGINES[name] = spec
    return spec


def get_engine(name: str) -> EngineSpec:
    if name not in ENGINES:
        raise ConfigError(f"unknown generation engine {name!r}; valid: {', '.join(ENGINES)}")
    return ENGINES[name]


def check_engine_config(config: Any) -> EngineSpec:
    """The chosen engine exists, no other engine's option is set, and the engine's own check
    passes. Returns the chosen engine's spec."""
    spec = get_engine(config.engine)
    defaults = {f.name: _default(f) for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}
    for other in ENGINES.values():
        if other.name == spec.name:
            continue
        changed = [k for k in other.options if k in defaults and getattr(config, k) != defaults[k]]
        if changed:
            raise ConfigError(f"{changed[0]} is set but engine={config.engine!r}; "
                              f"it applies to engine={other.name} only")
    if spec.check is not None:
        spec.check(config)
    return spec


def _default(f: dataclasses.Field) -> Any:
    """A field's default (a list option's too: ``default_factory``)."""
    if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def build_engine(name: str, model: Any, tokenizer: Any, device: Any, config: Any = None) -> GenerationEngine:
    """The engine ``name`` sampling from ``model``."""
    return get_engine(name).build(model, tokenizer, device=device, config=config)
