"""The key/value cache argument of a Hugging Face causal LM, across transformers versions.

transformers 5.x renamed the forward argument ``past_key_values`` to ``cache`` (the old name is
deprecated, to be removed in 5.40); 4.x only knows ``past_key_values``. The model's own
``forward`` signature says which one it takes, so the sampler and the shared-prompt forward pass
the cache under the name the installed model expects, and keep their own reference to the
cache object (a :class:`transformers.DynamicCache` is filled in place by the forward, whatever
the output field is called).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


def _inner(model: Any) -> Any:
    """The Hugging Face model under DDP, a PEFT wrapper or ``torch.compile``."""
    for _ in range(4):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            base = model.get_base_model()
            if base is model:
                break
            model = base
        else:
            break
    return model


@functools.lru_cache(maxsize=64)
def _name_for(model_type: Any) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(model: torch.nn.Module) -> str:
    """``"cache"`` when the model's ``forward`` takes that argument (transformers >= 5.2x),
    otherwise ``"past_key_values"``."""
    model_type: Any = type(_inner(model))
    return _name_for(model_type)


def new_cache() -> Any:
    """An empty :class:`transformers.DynamicCache` (grows with the sequence; rows can be
    gathered with ``batch_select_indices``)."""
    from transformers import DynamicCache

    return DynamicCache()


def with_cache(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model``'s forward, under the name it expects."""
    return {cache_argument(model): cache, "use_cache": True}
