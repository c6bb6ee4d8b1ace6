"""How the trained models are held across ranks: one process, DDP, or FSDP2 sharding.

The models are unchanged Hugging Face modules; :func:`parallelize` applies the parallelism to
them in one place (as torchtitan's ``parallelize`` does) and the trainer only calls the small
interface of :class:`Parallel`:

* ``single`` (one process): nothing is wrapped.
* ``ddp`` (``torchrun``, ``fsdp=false``): every rank holds the whole model; the trained module is
  wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, whose backward all-reduces
  the gradients.
* ``fsdp`` (``torchrun``, ``fsdp=true``): ``fully_shard`` on every decoder layer, then on the
  root (PyTorch FSDP2). Parameters, gradients and AdamW state are sharded over the ranks
  (``1 / world_size`` each); parameters are kept in float32 (the master copy) and all-gathered
  in ``dtype`` for compute (``MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=float32)``).
  The frozen reference is sharded too, in ``dtype``, or held on the CPU (``ref_offload``).

**Normalisation.** DDP and FSDP2 both *average* gradients over ranks, while the loss each rank
computes is its share of the global window loss (divided by the global token count, see the
core's ``aggregate``). The sum over ranks is the gradient of the whole window, so each rank's
loss is multiplied by :attr:`Parallel.loss_scale` ``= world_size`` before ``backward``; the
average of the scaled gradients is then exactly that sum (tested: 1 rank = 2 FSDP ranks).

**Lockstep.** Sharded forwards all-gather, so every rank must run the same forwards: generation
(with an engine that runs the policy) and evaluation run with the weights gathered
(:meth:`Parallel.full_weights`), and under DDP a
rank with fewer micro-batches joins the others (``Join``) instead of hanging.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

import torch

from ..config import ConfigError
from .distributed import DistContext

Kind = Literal["single", "ddp", "fsdp"]

LAUNCH_HINT = "torchrun --nproc_per_node N -m reinforcepp.cli train fsdp=true ..."


def check_launch(fsdp: bool, ref_offload: bool, world_size: int) -> None:
    """Refuse, before any model loads, what cannot run under this launch."""
    if fsdp and world_size < 2:
        raise ConfigError("fsdp=true shards the models over torchrun's ranks, "
                          f"but this is one process; launch with `{LAUNCH_HINT}`")
    if ref_offload and not fsdp:
        raise ConfigError("ref_offload=true offloads the sharded reference "
                          "(FSDP2 CPUOffloadPolicy); it needs fsdp=true")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model (the classes its ``_no_split_modules``
    names, found through PEFT and value-head wrappers)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fsdp=true: found no decoder layers in {type(model).__name__} (no _no_split_modules)")
    return layers


def gather_state(model: torch.nn.Module, all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s parameters and persistent buffers under its own names, whole, on the CPU.
    A model sharded by ``fully_shard`` is gathered (a collective: every rank calls it; rank 0
    gets the tensors, the others an empty dict; with ``all_ranks`` every rank gets them, on
    its device)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def full_state_dict(policy: torch.nn.Module, all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """The policy's full weights under the Hugging Face names of its base model, gathered from
    FSDP shards and with LoRA adapters merged in (``W + (alpha/r) B A``): what a generation
    engine loads to sample from the current policy (weight sync). Collective when the policy
    is sharded: every rank calls it, rank 0 gets the tensors (every rank with ``all_ranks``)."""
    from .lora import is_lora, merged_state_dict, scaling

    state = gather_state(policy, all_ranks)
    return merged_state_dict(state, scaling(policy)) if is_lora(policy) and state else state


def stream_full_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's full weights one tensor at a time, under the base model's Hugging Face names:
    what :func:`full_state_dict` holds at once (tied weights once), without ever holding it.

    A parameter sharded by ``fully_shard`` is gathered when it is reached
    (``DTensor.full_tensor()``, a collective: every rank iterates to the end, in the same order,
    and gets the tensor); a LoRA layer's weight comes merged with its adapters, ``W + scale B A``
    (:func:`~.lora.merged_state_dict`). Beyond the model itself, at most one whole tensor (and
    its two adapter matrices) is held at a time: a weight push from a sharded policy never makes
    a second copy of the model."""
    from .lora import is_lora, scaling

    lora = is_lora(policy)
    scale = scaling(policy) if lora else 0.0
    state = policy.state_dict(keep_vars=True)
    seen: set[int] = set()

    def whole(t: torch.Tensor) -> torch.Tensor:
        full = getattr(t, "full_tensor", None)
        return (full() if callable(full) else t).detach()

    for key, value in state.items():
        if ".lora_" in key or id(value) in seen:
            continue
        seen.add(id(value))
        name = key.removeprefix("base_model.model.") if lora else key
        tensor = whole(value)
        if lora and ".base_layer." in key:
            layer = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            a, b = state.get(f"{layer}.lora_A.default.weight"), state.get(f"{layer}.lora_B.default.weight")
            if key.endswith(".weight") and a is not None and b is not None:
                tensor = (tensor.float() + scale * (whole(b).float() @ whole(a).float())).to(tensor.dtype)
        yield name, tensor


class Parallel:
    """The parallelism of one run. ``kind`` is decided once, from the launch and ``fsdp``."""

    def __init__(self, dist: DistContext, device: torch.device, *, fsdp: bool = False,
                 compute_dtype: torch.dtype = torch.float32, ref_offload: bool = False,
                 full_finetune: bool = True) -> None:
        self.dist = dist
        self.device = device
        self.kind: Kind = "fsdp" if fsdp else ("ddp" if dist.enabled else "single")
        self.compute_dtype = compute_dtype
        self.ref_offload = ref_offload
        self.full_finetune = full_finetune  # LoRA: the base is frozen and needs no master copy
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # NCCL and FSDP2 use the current device

    @property
    def load_device(self) -> torch.device:
        """Where models are loaded before they are wrapped: the CPU under FSDP (``fully_shard``
        moves each rank's shard to the device, so no rank ever holds the whole model there)."""
        return torch.device("cpu") if self.sharded else self.device

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype trained parameters are stored (and AdamW updates them) in: float32 under
        FSDP (compute in ``dtype`` through ``MixedPrecisionPolicy``) and for full fine-tuning
        without FSDP (compute in ``dtype`` through autocast, :attr:`autocast_dtype`): updates
        smaller than 2^-8 of a weight would round away in bfloat16. A LoRA base without FSDP
        stays in ``dtype`` (frozen; PEFT keeps the adapters in float32)."""
        return torch.float32 if self.sharded or self.full_finetune else self.compute_dtype

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype that gives compute in ``dtype`` over float32 master weights when
        not sharding (None when ``dtype`` is float32 or FSDP casts the parameters itself)."""
        if self.sharded or self.master_dtype == self.compute_dtype:
            return None
        return self.compute_dtype

    @property
    def loss_scale(self) -> float:
        """Factor on each rank's loss share so that the engines' gradient *average* equals the
        gradient of the global window loss (their sum)."""
        return float(self.dist.world_size) if self.kind != "single" else 1.0

    # ------------------------------------------------------------------ wrapping
    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.dist.world_size,))

    def _shard(self, model: torch.nn.Module, *, frozen: bool) -> torch.nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        offload = (CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if frozen and self.ref_offload
                   else OffloadPolicy())
        mesh = self._mesh()
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
        return model

    def trained(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run training forwards through. FSDP shards ``model`` in place and
        returns it; DDP returns a wrapper around it (``model`` itself stays the plain module
        for generation, no-grad forwards and saving)."""
        if self.kind == "fsdp":
            return self._shard(model, frozen=False)
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # no buffer sync in the forward (rotary tables are the same on every rank); torch
            # 2.13 renamed the switch, and warns on the old name
            import inspect

            switches = inspect.signature(DistributedDataParallel.__init__).parameters
            name = "forward_sync_buffers" if "forward_sync_buffers" in switches else "broadcast_buffers"
            no_sync: dict[str, Any] = {name: False}
            return DistributedDataParallel(model, device_ids=ids, **no_sync)
        return model

    def frozen(self, model: Optional[torch.nn.Module]) -> Optional[torch.nn.Module]:
        """The reference: sharded in ``dtype`` under FSDP (on the CPU with ``ref_offload``),
        otherwise as it is. A module without parameters of its own (the LoRA adapters-off view
        of the policy) is left alone."""
        if model is None or self.kind != "fsdp" or not any(True for _ in model.parameters()):
            return model
        return self._shard(model.to(self.compute_dtype), frozen=True)

    def weights(self, policy: torch.nn.Module):
        """The generation engine's weight provider (``engines.WeightProvider``): the model's
        own parameters when it is plain, else :func:`stream_full_weights`: gathered tensor by
        tensor on every rank (sharded) and with LoRA merged, under the base model's names."""
        from ..engines import full_weights
        from .lora import is_lora

        if not self.sharded and not is_lora(policy):
            return full_weights(policy)
        return lambda: stream_full_weights(policy)

    def can_hold_forwards(self, forwards: int) -> bool:
        """Whether ``forwards`` training forwards may run before their backward passes (fused
        old log-probs): DDP and FSDP2 pair each forward with its backward, so one at most."""
        return self.kind == "single" or forwards <= 1

    # ------------------------------------------------------------------ the step
    def clip_grad_norm(self, params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over every shard); returns it as a plain tensor."""
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], max_norm)
        full = getattr(norm, "full_tensor", None)
        return full() if full is not None else norm

    def accumulate(self, *train_modules: Optional[torch.nn.Module]):
        """Context for one optimizer window's micro-batches: under DDP a rank that runs out of
        micro-batches shadows the others' all-reduces (``Join``); FSDP needs equal batches
        (validated) and one process needs nothing."""
        if self.kind == "ddp":
            from torch.distributed.algorithms.join import Join
            from torch.nn.parallel import DistributedDataParallel

            unwrapped = [getattr(m, "_orig_mod", m) for m in train_modules]  # under torch.compile
            return Join([m for m in unwrapped if isinstance(m, DistributedDataParallel)])
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """Hold ``model``'s full weights for the duration (generation, evaluation) when it is
        sharded: its forwards then run without collectives, so ranks may run different numbers
        of them. The other sharded models (reference, critic) stay sharded."""
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not modules:
            yield
            return
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()
                # FSDP2's default: the root keeps its weights
                m.set_reshard_after_forward(m is not model, recurse=False)

    # ------------------------------------------------------------------ state
    def gather_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter and persistent buffer of ``model`` under its own names, whole, on
        the CPU (collective under FSDP: every rank calls it; rank 0 gets the tensors, the
        others an empty dict)."""
        return gather_state(model)

    def full_state_dict(self, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
        """See :func:`full_state_dict`."""
        return full_state_dict(policy)

    def load_full_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.kind != "fsdp":
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))

    def save_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       path: Path) -> Optional[dict[str, Any]]:
        """Sharded: every rank writes its shard under ``path`` (DCP) and ``None`` is returned.
        Otherwise the state dict is returned, to be stored with the trainer state."""
        if self.kind != "fsdp":
            return optimizer.state_dict()
        from .sharded_checkpoint import save_optimizer

        save_optimizer(model, optimizer, path)
        return None

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path,
                       stored: Optional[dict[str, Any]]) -> None:
        """Load whichever form the checkpoint holds: a DCP directory (written by any number
        of ranks, resharded to this run's) or the stored state dict."""
        if stored is not None:
            optimizer.load_state_dict(stored)
            return
        from .sharded_checkpoint import load_optimizer

        load_optimizer(model, optimizer, path)
