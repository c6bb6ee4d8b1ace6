"""Saving and loading a language-model run's checkpoint.

A checkpoint is ``RUN_DIR/checkpoints/step_N/``: the policy as a Hugging Face model directory
(safetensors; LoRA: the adapter, merged into a full model at the last step), the optimizers
(in the trainer state, or DCP shards under FSDP), a refreshed reference when
``ref_update_every`` moves it, and ``trainer_state.safetensors`` + ``trainer_state.json``
(:mod:`reinforcepp.run.state`: no pickle) with the scheduler, the data position, every rank's
RNG state and the run's counters. Written atomically by rank 0 (:mod:`.sharded_checkpoint`);
every rank takes part in the collectives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..run.folder import RunDirError
from ..run.rng import rng_state, set_rng_state, set_seed
from ..run.state import load_state, save_state
from .reference import REFERENCE_RECORD, record_digest
from .runtime import Runtime
from .sharded_checkpoint import rank_directory, write_policy

STATE_NAME = "trainer_state"
"""``trainer_state.safetensors`` + ``trainer_state.json`` in each checkpoint (:mod:`reinforcepp.run.state`)."""


def _all_ranks_rng(rt: Runtime) -> Any:
    rng: Any = rng_state()
    if rt.dist.enabled:
        import torch.distributed as dist

        every: list[Any] = [None] * rt.dist.world_size
        dist.all_gather_object(every, rng)
        rng = every
    return rng


def save_checkpoint(rt: Runtime, models: Any, update: Any, loader_state: dict[str, Any], step: int,
                    counters: dict[str, Any], *, merged: bool, save_reference: bool) -> Path:
    """Write ``checkpoints/step_<step>``: the policy (``merged``: LoRA merged into a full model),
    the optimizers and scheduler of ``update`` (:class:`~.update.PolicyUpdate`), the data
    position ``loader_state``, the RNG of every rank, ``counters`` (data: numbers, lists,
    tensors), and with ``save_reference`` the (refreshed) reference. Returns its path (on every rank)."""
    rng = _all_ranks_rng(rt)
    policy_state = rt.parallel.gather_state(models.policy)  # collectives: every rank takes part
    critic_state = rt.parallel.gather_state(models.critic) if models.critic is not None else None
    with rank_directory(rt.checkpoints, step, rt.dist) as d:
        optimizer_state = rt.parallel.save_optimizer(models.policy, update.optimizer, d / "optimizer")
        critic_optimizer_state = None
        if models.critic is not None and update.critic_optimizer is not None:
            critic_optimizer_state = rt.parallel.save_optimizer(models.critic, update.critic_optimizer,
                                                                d / "critic_optimizer")
        if not rt.dist.is_main:
            return rt.checkpoints.path(step)
        write_policy(models.policy, policy_state, d, models.tokenizer, merged=merged)
        if save_reference and models.reference is not None:  # the refreshed reference moves with the run
            models.reference.save_pretrained(d / "reference", safe_serialization=True)
        state = {"step": step, "optimizer": optimizer_state, "scheduler": update.scheduler.state_dict(),
                 "loader": loader_state, "rng": rng, "reference_record": record_digest(rt.run_dir),
                 "weight_norm_start": update.divergence.start, **counters}
        if models.critic is not None:
            state["critic"] = critic_state
            state["critic_optimizer"] = critic_optimizer_state
        save_state(d, STATE_NAME, state)
    return rt.checkpoints.path(step)


def apply_resumed_lr(optimizer: Any, scheduler: Any, lr: float) -> None:
    """The scheduler's state holds the run's learning rate; an ``lr`` given on resume (reported
    as ``resume: lr: saved ..., now ... (yours)``) applies from here on, along the same schedule
    (``lr * factor(step)``). Nothing changes when it is the saved one."""
    if all(base == lr for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def load_checkpoint(path: Path, rt: Runtime, models: Any, update: Any, loader: Any, *, seed: int) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``update`` and ``loader`` (the policy and
    reference were loaded from the checkpoint when the models were built), and this rank's RNG
    state (another number of ranks: fresh, distinct seeds). Returns the stored state, whose
    ``step`` and counters the trainer takes back."""
    state = load_state(path, STATE_NAME)
    recorded = state.get("reference_record")
    if recorded is not None and record_digest(rt.run_dir) != recorded:
        raise RunDirError(f"cannot resume: {rt.run_dir / REFERENCE_RECORD} is not the reference record the "
                          f"checkpoint {path.name} was written with (sha256): the run folder's reference was replaced "
                          "or mixed from another run; restore it, or start a new run")
    rt.parallel.load_optimizer(models.policy, update.optimizer, path / "optimizer", state["optimizer"])
    update.scheduler.load_state_dict(state["scheduler"])
    apply_resumed_lr(update.optimizer, update.scheduler, update.config.lr)
    # the bound of the whole run, from its start
    update.divergence.start = float(state.get("weight_norm_start", update.divergence.start))
    loader.load_state_dict(state["loader"])
    if models.critic is not None and update.critic_optimizer is not None:
        rt.parallel.load_full_state_dict(models.critic, state["critic"])
        rt.parallel.load_optimizer(models.critic, update.critic_optimizer, path / "critic_optimizer",
                                   state["critic_optimizer"])
    rng: Optional[Any] = state["rng"]
    if isinstance(rng, list):
        if len(rng) != rt.dist.world_size:  # another number of ranks: fresh, distinct sampling seeds
            set_seed(seed + 100_003 * rt.dist.rank + 7 * state["step"])
            rng = None
        else:
            rng = rng[rt.dist.rank]
    if rng is not None:
        set_rng_state(rng)
    return state
