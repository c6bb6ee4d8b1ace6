"""Weights on the wire: the pieces and chunks of a weight push to a rollout server.

A push streams the policy's weights, tensor by tensor as the trainer gathers them, and never
holds more than one *piece* (plus the tensor being added): a safetensors file of whole tensors
under their Hugging Face names, about ``piece_bytes`` long (a larger tensor makes a piece of its
own). Each piece travels in *chunks* of at most ``chunk_bytes`` (the server's request limit),
each with its SHA-256; the push ends with the SHA-256 of every chunk, in order
(:mod:`.protocol`, docs/remote.md). Safetensors holds raw tensor bytes and a JSON header:
reading it runs no code.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional

import torch
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def wire_dtype(name: str) -> Optional[torch.dtype]:
    """The dtype a server asks for (its ``/info`` ``dtype``); None when unknown (sent as is)."""
    return DTYPES.get(name)


class PieceWriter:
    """Collects ``(name, tensor)`` pairs into safetensors pieces of about ``piece_bytes``.

    Floating-point tensors are cast to ``dtype`` (the server's; None = as they are); tensors
    are copied to the CPU one at a time, and a piece is returned (bytes) as soon as it is full.
    """

    def __init__(self, piece_bytes: int, dtype: Optional[torch.dtype] = None) -> None:
        if piece_bytes < 1:
            raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
        self.piece_bytes, self.dtype = piece_bytes, dtype
        self.tensors: dict[str, Tensor] = {}
        self.size = 0

    def add(self, name: str, tensor: Tensor) -> Optional[bytes]:
        """Add one tensor; returns the finished piece when this one would overflow it."""
        t = tensor.detach()
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        t = t.to("cpu").contiguous()
        if name in self.tensors:
            raise ValueError(f"weight {name!r} given twice")
        done = self.flush() if self.tensors and self.size + t.nbytes > self.piece_bytes else None
        self.tensors[name] = t.clone() if any(t.data_ptr() == o.data_ptr() for o in self.tensors.values()) else t
        self.size += t.nbytes
        return done

    def flush(self) -> Optional[bytes]:
        """The piece collected so far (None when empty)."""
        if not self.tensors:
            return None
        from safetensors.torch import save

        piece = save(self.tensors)
        self.tensors, self.size = {}, 0
        return piece


def chunks_of(piece: bytes, chunk_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """``(chunk, is_the_piece's_last)`` slices of at most ``chunk_bytes``."""
    view = memoryview(piece)
    for start in range(0, len(piece), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes]), start + chunk_bytes >= len(piece)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_piece(data: bytes) -> dict[str, Tensor]:
    """The tensors of one safetensors piece (ValueError when it is not one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"a weight piece is not a safetensors file: {' '.join(str(exc).split())[:200]}") from None
