"""Checkpoint state that cannot run code when loaded: tensors in safetensors, the rest in JSON.

A trainer's state (step, optimizer and scheduler state dicts, RNG states, data position,
normaliser statistics, ...) is a tree of dicts, lists, tuples, scalars, strings, tensors and
numpy arrays. :func:`save_state` writes it as two files::

    NAME.safetensors   every tensor and array leaf, keyed by number and path ("3:/optimizer/state/0/exp_avg")
    NAME.json          the tree, with {"__tensor__": key} / {"__ndarray__": key} in place of those leaves

and :func:`load_state` rebuilds the same tree (tuples, non-string dict keys, numpy dtypes and
non-finite floats included). Neither file is pickle, so a checkpoint received from someone else
is data, never code. Trainers call only these two functions (and :func:`refuse_pickle` on
load), so other writers of checkpoint state -- a sharded optimizer saved through
``torch.distributed.checkpoint``, say -- can sit beside them in the same directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import InputError

FORMAT = "reinforcepp-state/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class CheckpointFormatError(InputError):
    """A checkpoint that is not in the safe format (an old pickle checkpoint) or is damaged."""


def _encode(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        key = f"{len(tensors)}:{path}"  # numbered: unique even when dict keys contain "/"
        tensors[key] = node.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(node, np.ndarray):
        key = f"{len(tensors)}:{path}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(node).copy())
        return {"__ndarray__": key, "dtype": node.dtype.str}
    if isinstance(node, np.generic):
        return _encode(node.item(), path, tensors)
    if isinstance(node, float) and not math.isfinite(node):
        return {"__float__": repr(node)}
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(node)]}
    if isinstance(node, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(node)]
    if isinstance(node, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in node):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in node.items()}
        items = []
        for k, v in node.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"checkpoint state: key {k!r} at {path or '/'} is not a str/int/float/bool")
            items.append([k, _encode(v, f"{path}/{k}", tensors)])
        return {"__items__": items}
    raise TypeError(f"checkpoint state: {type(node).__name__} at {path or '/'} cannot be saved as data "
                    "(tensors, arrays, numbers, strings, lists, dicts only)")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy().astype(np.dtype(node["dtype"]), copy=True)
    if "__float__" in node:
        return float(node["__float__"])
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__items__" in node:
        return {k: _decode(v, tensors) for k, v in node["__items__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def fsync_file(path: str | Path) -> None:
    """Flush a written file to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (and ``root`` itself), so that a crash or
    power loss after this call cannot leave a checkpoint marked complete with missing data."""
    root = Path(root)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_file(dirpath)


def save_state(directory: str | Path, name: str, state: Mapping[str, Any]) -> None:
    """Write ``state`` as ``directory/NAME.safetensors`` + ``directory/NAME.json`` (see the module docstring)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(dict(state), "", tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps({"format": FORMAT, "state": tree}))


def load_state(directory: str | Path, name: str) -> dict[str, Any]:
    """Read what :func:`save_state` wrote. Refuses pickle checkpoints of older versions
    (:func:`refuse_pickle`) and names the damaged file when one cannot be read."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta, blob = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not meta.exists():
        refuse_pickle(directory)
        raise CheckpointFormatError(f"{meta} is missing: {directory} is not a complete reinforcepp checkpoint")
    try:
        doc = json.loads(meta.read_text())
        tensors = load_file(str(blob))
    except Exception as e:  # noqa: BLE001 -- any unreadable file is reported the same way
        raise CheckpointFormatError(f"{directory}: cannot read {meta.name} / {blob.name} ({type(e).__name__}: {e}); "
                                    "the checkpoint is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointFormatError(f"{meta}: unknown checkpoint format "
                                    f"{doc.get('format') if isinstance(doc, dict) else doc!r} (expected {FORMAT})")
    return _decode(doc["state"], tensors)


def refuse_pickle(directory: str | Path) -> None:
    """Raise :class:`CheckpointFormatError` if ``directory`` holds a pickle state file (the
    format of reinforcepp before safe checkpoints): unpickling runs whatever code the file
    names, so it is never loaded."""
    folder = Path(directory)
    paths = folder.iterdir() if folder.is_dir() else iter(())
    found = sorted(p.name for p in paths if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if found:
        raise CheckpointFormatError(
            f"{Path(directory) / found[0]} is a pickle checkpoint (older reinforcepp); pickle can run code when "
            "loaded, so it is not read. "
            "Start a new run, or resume with the reinforcepp version that wrote it"
        )


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (no pickle)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
    return torch.load(path, weights_only=True, map_location="cpu")
