"""Checkpoints written by several ranks: sharded optimizer state through
``torch.distributed.checkpoint`` (DCP), read back without running any code from the files.

* :func:`rank_directory`: every rank writes into the directory rank 0 creates; the directory
  appears under its final name only when every rank is done (atomic, as one process is).
  Several nodes need a shared filesystem for the run directory.
* :func:`save_optimizer` / :func:`load_optimizer`: each rank writes its shard of the AdamW state
  (DCP ``.distcp`` files plus a ``.metadata`` index). Loading reshards, so a run saved by two
  ranks resumes on one (tested) or on four.
* **No pickle from a checkpoint.** DCP's ``FileSystemReader.read_metadata`` would unpickle the
  ``.metadata`` file with no restriction, and its planner would read the non-tensor entries
  with ``weights_only=False``: a received checkpoint could run code. :class:`SafeReader` reads ``.metadata`` with
  an unpickler that admits only DCP's metadata classes, ``torch.Size``, dtypes, layouts, paths
  and plain containers (anything else is refused before it is constructed), and
  :class:`SafeLoadPlanner` reads the other entries with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ..run import CheckpointManager
from .distributed import DistContext

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's metadata names something other than plain data."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"checkpoint metadata refers to {module}.{name}, "
                                    "which is not checkpoint data; refusing to load it")


def load_metadata(data: bytes) -> Metadata:
    """Unpickle DCP metadata through the allow-list."""
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through :func:`load_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f.read())
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def rank_directory(manager: CheckpointManager, step: int, dist: DistContext) -> Iterator[Path]:
    """Every rank gets the temporary directory of checkpoint ``step``; rank 0 renames it into
    place after all ranks have written their part."""
    if not dist.enabled:
        with manager.save(step) as d:
            yield d
        return
    import torch.distributed as tdist

    box: list[Any] = [None]
    if dist.is_main:
        with manager.save(step) as d:
            box[0] = str(d)
            tdist.broadcast_object_list(box, src=0)
            yield d
            dist.barrier()  # every rank's shard is on disk
    else:
        tdist.broadcast_object_list(box, src=0)
        yield Path(box[0])
        dist.barrier()
    dist.barrier()  # the checkpoint is in place before anyone goes on


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Each rank's shard of the optimizer state, keyed by parameter names (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load (and reshard to this run's ranks) an optimizer state written by :func:`save_optimizer`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # refuse a planted payload with a plain error, before DCP reads it
    load_metadata((Path(path) / ".metadata").read_bytes())
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the template (initialises AdamW's state)
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def write_policy(policy: Any, state: dict[str, torch.Tensor], directory: Path, tokenizer, *, merged: bool) -> None:
    """The policy's files in a checkpoint, from its gathered ``state`` (rank 0).

    Full fine-tuning: ``model/`` (safetensors, loads with ``from_pretrained``). LoRA:
    ``adapter/`` (PEFT format), and with ``merged`` (the final checkpoint) also ``model/``,
    the base with the adapters folded in."""
    from .lora import is_lora, merged_state_dict, scaling

    if is_lora(policy):
        policy.save_pretrained(directory / "adapter", state_dict=state, safe_serialization=True)
        if not merged:
            return
        base = policy.get_base_model()
        base.save_pretrained(directory / "model", state_dict=merged_state_dict(state, scaling(policy)),
                             safe_serialization=True)
    else:
        policy.save_pretrained(directory / "model", state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(directory / "model")
