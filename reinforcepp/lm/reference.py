"""The frozen reference of the KL term: a local model, a served one (URL), or the LoRA base.

:func:`load_reference` decides which, once:

* no KL term (``kl_placement=none`` or ``kl_coef=0``) and no LoRA: none, and no reference forward;
* ``ref_model`` given (an object, a path or hub name, or ``http(s)://`` for a
  :class:`~reinforcepp.remote.RemoteReference`, which has the same interface);
* otherwise the initial policy (after any warm start), frozen. A resumed run must use the same
  one: when the policy came unchanged from a local directory, ``RUN_DIR/reference.json`` records
  that directory and the sha256 of its files; otherwise a copy is saved in ``RUN_DIR/reference``
  and ``reference.json`` records the sha256 of the copy's files. On resume the record is checked
  (:func:`check_reference_record`): a run folder never chooses a model, so a recorded directory
  must be the ``model`` the user gives, with the same files; the copy must hold the files
  recorded; and the record itself must be the one the checkpoint saw (its sha256 is saved in
  each checkpoint, :func:`record_digest`);
* under LoRA the reference is the base with the adapters switched off (:func:`apply_lora`).

``ref_update_every`` refreshes a local reference towards the policy (:func:`refresh_reference`);
the refreshed one is saved in each checkpoint and resumed from there.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ConfigError
from ..core import mix_reference
from ..errors import setup_phase
from ..remote import RemoteReference, is_url, settings_from
from ..run.folder import RunDirError
from .config import LMConfig
from .lora import AdaptersOff, add_lora, is_lora, save_base
from .models import check_model_source, frozen, frozen_copy, load_causal_lm, weights_fingerprint
from .runtime import Runtime

REFERENCE_RECORD = "reference.json"
"""RUN_DIR/reference.json: the initial model's directory and the sha256 of its files, kept
instead of a copy when the reference is that directory unchanged."""

Reference = Any
"""A frozen ``torch.nn.Module`` (a causal LM, or the LoRA :class:`~.lora.AdaptersOff` view) or a
:class:`~reinforcepp.remote.RemoteReference`."""


def kl_is_on(config: LMConfig) -> bool:
    return config.effective_kl_placement != "none"


def load_reference(config: LMConfig, rt: Runtime, policy: torch.nn.Module, tokenizer: Any, given: Optional[Reference],
                   *, given_policy: bool, lora: bool) -> Optional[Reference]:
    """The reference before LoRA and parallelism are applied (see the module docstring)."""
    if not kl_is_on(config) and not lora:
        if config.kl_coef == 0 and config.resolved_kl_placement != "none" and rt.dist.is_main:
            print(f"kl_coef=0: the KL term ({config.resolved_kl_placement}) is zero, so no reference model is loaded "
                  "and no reference forward runs", file=sys.stderr)
        return None
    if given is None and is_url(config.ref_model):
        given = RemoteReference(config.ref_model, settings_from(config), temperature=config.temperature,
                                batch_size=config.remote_batch_size)
    if isinstance(given, RemoteReference):  # same interface: the experience maker does not know
        return _connect_remote(config, given, policy, tokenizer)
    if given is not None:
        return frozen(given.to(rt.device))
    if config.ref_model is not None:
        check_model_source("ref_model", config.ref_model)
        with setup_phase(f"loading ref_model={config.ref_model}"):
            return frozen(load_causal_lm(config.ref_model, dtype=rt.dtype, device=rt.parallel.load_device,
                                         trust_remote_code=config.trust_remote_code))
    if rt.resume_from is not None:
        return _resumed_reference(config, rt, lora)
    if rt.dist.is_main:  # when the run folder opens: at once, or when training starts (runtime.RunFolder)
        rt.folder.when_open(lambda run_dir: _record_initial(config, run_dir, policy, tokenizer,
                                                            given_policy=given_policy, lora=lora))
    return None if lora else frozen_copy(policy)


def _connect_remote(config: LMConfig, reference: RemoteReference, policy: torch.nn.Module,
                    tokenizer: Any) -> RemoteReference:
    if config.ref_update_every:
        raise ConfigError("ref_update_every refreshes a local reference from the policy; "
                          "a served reference (ref_model=URL) cannot be refreshed")
    if reference.temperature != config.temperature:
        raise ConfigError(f"RemoteReference(temperature={reference.temperature}) but temperature={config.temperature}: "
                          "reference log-probs must use the sampling temperature")
    reference.connect(policy, tokenizer)
    return reference


def _record_initial(config: LMConfig, run_dir: Path, policy: torch.nn.Module, tokenizer: Any, *, given_policy: bool,
                    lora: bool) -> None:
    """What a resumed run reloads the reference from: a record of an unchanged local model
    directory, or a copy (under LoRA with a named model: nothing, the base is that model). Written
    before the first update, so ``policy`` is the initial policy."""
    saved, record = run_dir / "reference", run_dir / REFERENCE_RECORD
    if not given_policy and config.model is not None and Path(config.model).is_dir():
        record.parent.mkdir(parents=True, exist_ok=True)
        initial = {"path": str(Path(config.model).resolve()), "sha256": weights_fingerprint(config.model)}
        record.write_text(json.dumps(initial, indent=1))
    elif not (lora and config.model):
        save_base(policy, saved)
        # so that `reinforcepp serve reference --model RUN/reference` can check the tokenizer
        tokenizer.save_pretrained(saved)
        record.write_text(json.dumps({"copy": saved.name, "sha256": weights_fingerprint(str(saved))}, indent=1))


def _resumed_reference(config: LMConfig, rt: Runtime, lora: bool) -> Optional[torch.nn.Module]:
    """The reference of a resumed run: refreshed in the checkpoint, its saved copy, or the
    recorded initial directory when its files are unchanged (under LoRA: the base, loaded
    with the policy)."""
    assert rt.resume_from is not None
    load: dict[str, Any] = dict(dtype=rt.dtype, device=rt.parallel.load_device)
    if (rt.resume_from / "reference").exists():  # refreshed by ref_update_every
        return frozen(load_causal_lm(str(rt.resume_from / "reference"), safetensors_only=True, **load))
    source = check_reference_record(config, rt, lora)
    if lora or source is None:
        return None
    if source == rt.run_dir / "reference":  # the run's own copy
        return frozen(load_causal_lm(str(source), safetensors_only=True, **load))
    return frozen(load_causal_lm(str(source), trust_remote_code=config.trust_remote_code, **load))


def check_reference_record(config: LMConfig, rt: Runtime, lora: bool) -> Optional[Path]:
    """Where a resumed run's initial reference is, checked against ``RUN_DIR/reference.json``:
    the run's copy (``RUN_DIR/reference``) holding the files recorded, or the recorded initial
    model directory, which must be the ``model`` the user gives (a run folder never chooses a
    model) with unchanged files. None under LoRA with a hub model (the base is ``model``). Raises
    :class:`RunDirError` naming the record and what differs."""
    saved, record = rt.run_dir / "reference", rt.run_dir / REFERENCE_RECORD
    if not record.exists():
        if saved.exists():  # a run folder of an older version: its copy, unrecorded
            return saved
        if lora and config.model:
            return None
        raise RunDirError(f"cannot resume: neither the reference copy {saved} nor its record {record} exists")
    info = read_reference_record(record)
    if "copy" in info:
        if not saved.is_dir() or weights_fingerprint(str(saved)) != info["sha256"]:
            raise RunDirError(f"cannot resume: the reference copy {saved} does not hold the files recorded in "
                              f"{record} (sha256); restore it from where the run was copied, or set ref_model=PATH "
                              "to use another reference")
        return saved
    path = Path(info["path"])
    if config.model is None or Path(config.model).expanduser().resolve() != path:
        raise RunDirError(f"cannot resume: {record} names {path} as the initial model and reference, and a run "
                          f"folder never chooses a model: give model={path} (the run's model) if you trust it, or "
                          f"ref_model=PATH for another reference (your model: {config.model})")
    if not path.is_dir() or weights_fingerprint(str(path)) != info["sha256"]:
        raise RunDirError(f"cannot resume: the reference is the initial model {path}, whose files "
                          "have changed or gone since the run started (sha256 recorded in "
                          f"{record}); restore them, or set ref_model=PATH to use another reference")
    return path


def read_reference_record(record: Path) -> dict[str, Any]:
    """``reference.json`` as written by :func:`_record_initial` (``{"path": DIR, "sha256":
    {file: hex}}`` or ``{"copy": "reference", "sha256": ...}``), or :class:`RunDirError`: only
    these fields, of these types, are read."""
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunDirError(f"cannot resume: {record} is not readable JSON ({type(e).__name__})") from None
    valid = isinstance(info, dict) and set(info) in ({"path", "sha256"}, {"copy", "sha256"})
    hashes = info.get("sha256") if valid else None
    valid = valid and isinstance(hashes, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in hashes.items())
    if valid and "copy" in info:
        valid = info["copy"] == "reference"
    elif valid:
        valid = isinstance(info["path"], str) and Path(info["path"]).is_absolute()
    if not valid:
        raise RunDirError(f"cannot resume: {record} is not a reference record as reinforcepp writes it "
                          "({\"path\": DIR, \"sha256\": {...}} or {\"copy\": \"reference\", \"sha256\": {...}})")
    return info


def record_digest(run_dir: Path) -> Optional[str]:
    """sha256 of ``RUN_DIR/reference.json`` (None when there is none): saved in each checkpoint,
    so that a record replaced or mixed in from another run is refused on resume."""
    record = run_dir / REFERENCE_RECORD
    return hashlib.sha256(record.read_bytes()).hexdigest() if record.is_file() else None


def apply_lora(policy: torch.nn.Module, config: LMConfig) -> tuple[torch.nn.Module, Optional[AdaptersOff]]:
    """Adapters on the (warm-started) base, unless the policy has them already; the reference
    is then the base with them off (None without a KL term)."""
    if not is_lora(policy):
        policy = add_lora(policy, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          target_modules=config.lora_target_modules)
    return policy, AdaptersOff(policy) if kl_is_on(config) else None


def refresh_reference(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """``ref <- alpha * policy + (1 - alpha) * ref`` (TRL's sync_ref_model), in place."""
    mix_reference(reference.parameters(), policy.parameters(), alpha)
