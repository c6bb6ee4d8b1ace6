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
from typing import Any, Optional, cast

import torch


def unwrap(model: Any) -> Any:
    """The Hugging Face model under DDP, a PEFT wrapper, ``torch.compile`` or a view that names the
    model it forwards to as ``wrapped_model`` (a LoRA policy's adapters-off reference, whose
    ``forward`` takes ``*args, **kwargs``)."""
    for _ in range(5):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif getattr(model, "wrapped_model", None) is not None:
            model = model.wrapped_model
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
    model_type: Any = type(unwrap(model))
    return _name_for(model_type)


def new_cache(reserve: int = 0) -> Any:
    """An empty :class:`transformers.DynamicCache` (grows with the sequence; rows can be
    gathered with ``batch_select_indices``). With ``reserve > 0`` its layers are
    :class:`ReservedLayer` s that hold room for that many positions: for decoding without
    gradient (they write in place)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if reserve > 0:
        layer = _reserved_layer_type()
        cache.layer_class_to_replicate = cast(Any, lambda: layer(reserve))  # called with no arguments per new layer
    return cache


@functools.lru_cache(maxsize=1)
def _reserved_layer_type() -> type:
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A :class:`DynamicLayer` whose keys and values live in ``(B, heads, capacity, d)``
        buffers reserved ahead: each step writes its new positions in place and the layer hands
        out views of the filled part. ``DynamicLayer`` concatenates the whole cache at every
        step instead, an ``O(T)`` copy per token and ``O(T^2)`` per response
        (``benchmarks/sampler_cache.py``: 6.1 s -> 4.7 s CPU for 64 x 256 tokens, 2.6M
        parameters). A longer sequence than reserved
        doubles the buffer; a layer whose keys were replaced (``batch_select_indices``) copies
        them into a new buffer at its next update. In-place writes: no autograd through it."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.buffers: Optional[tuple[torch.Tensor, torch.Tensor]] = None

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            cur, n = self.get_seq_length(), key_states.shape[-2]
            if not self._holds(cur + n, key_states):
                self._reserve(cur, cur + n, key_states, value_states)
            assert self.buffers is not None
            k, v = self.buffers
            k[..., cur : cur + n, :] = key_states
            v[..., cur : cur + n, :] = value_states
            self.keys, self.values = k[..., : cur + n, :], v[..., : cur + n, :]
            return self.keys, self.values

        def _holds(self, length: int, key_states: torch.Tensor) -> bool:
            if self.buffers is None:
                return False
            k, keys = self.buffers[0], cast(torch.Tensor, self.keys)
            same_rows = k.shape[:2] == key_states.shape[:2] and k.dtype == key_states.dtype
            in_place = keys.numel() == 0 or keys.data_ptr() == k.data_ptr()
            return same_rows and in_place and length <= k.shape[-2]

        def _reserve(self, cur: int, length: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            if length > self.capacity:  # doubling keeps the copies O(1) per position
                self.capacity = 2 * length
            b, h = key_states.shape[:2]
            k = key_states.new_empty(b, h, self.capacity, key_states.shape[-1])
            v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            if cur:
                k[..., :cur, :] = cast(torch.Tensor, self.keys)
                v[..., :cur, :] = cast(torch.Tensor, self.values)
            self.buffers = (k, v)

    return ReservedLayer


def with_cache(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model``'s forward, under the name it expects."""
    return {cache_argument(model): cache, "use_cache": True}
