"""LoRA adapters through PEFT (``lora_rank > 0``; the ``lora`` extra).

Only the adapters train: each targeted linear layer computes ``W x + (alpha / r) B A x`` with
``W`` frozen, ``A`` (``r x in``) and ``B`` (``out x r``, zero at the start) trained.

* The **reference** is the same base model with the adapters switched off
  (:class:`AdaptersOff`), so no second copy of the weights is loaded: ``pi_ref = pi_W``.
* Checkpoints hold the adapter in PEFT's format (``adapter/``: ``adapter_config.json``,
  ``adapter_model.safetensors``) and its optimizer state; the base stays in ``RUN_DIR/reference``
  (or ``model=``). The final checkpoint also holds the merged model (``model/``, loads with
  ``from_pretrained``). Resuming loads the base, then the adapter as trainable.
* :func:`merged_state_dict` turns a PEFT state dict into the base model's names with
  ``W + (alpha / r) B A`` folded in: what a generation engine needs for weight sync.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..config import ConfigError

MISSING = "LoRA needs PEFT: bash install.sh lora  (or pip install 'reinforcepp[lora]')"


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ImportError(MISSING) from e
    return peft


def is_lora(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def linear_module_names(model: Any) -> list[str]:
    """Short names of the model's linear layers (``q_proj``, ``up_proj``...), the LM head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def add_lora(model: torch.nn.Module, *, rank: int, alpha: float, dropout: float,
             target_modules: Sequence[str] = ()) -> torch.nn.Module:
    """Wrap ``model`` with fresh adapters on ``target_modules`` (default: every linear layer
    of attention and MLP); the base weights are frozen."""
    peft = _peft()
    available = linear_module_names(model)
    targets = list(target_modules) or available
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ConfigError(f"lora_target_modules: {', '.join(unknown)} is not a linear layer "
                          f"of this model; its linear layers are {', '.join(available)}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def load_lora(base: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """The base with a saved adapter, trainable (``is_trainable=True``: PEFT loads adapters
    frozen by default, which is what made resumed runs train nothing)."""
    from .models import realign

    peft = _peft()
    return realign(peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True))


class AdaptersOff(torch.nn.Module):
    """The reference of a LoRA policy: the policy's forward with its adapters disabled.

    It holds no parameters of its own (the policy is kept outside the module tree), so
    freezing it or moving it leaves the policy alone.
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self._policy = [policy]

    @property
    def wrapped_model(self) -> torch.nn.Module:
        """The policy it forwards to (:func:`reinforcepp.engines.kv_cache.unwrap` reads it)."""
        return self._policy[0]

    def forward(self, *args, **kwargs):
        policy = self._policy[0]
        with policy.disable_adapter():
            return policy(*args, **kwargs)


def save_base(policy: Any, directory: str | Path) -> None:
    """The base weights as a Hugging Face model directory (a LoRA policy's adapters left out)."""
    if not is_lora(policy):
        policy.save_pretrained(directory, safe_serialization=True)
        return
    state = {k: v.detach().cpu() for k, v in policy.state_dict().items()}
    policy.get_base_model().save_pretrained(directory, state_dict=merged_state_dict(state, 0.0),
                                            safe_serialization=True)


def scaling(model: Any) -> float:
    """``alpha / r`` of the PEFT model's adapter (``alpha / sqrt(r)`` with rsLoRA)."""
    cfg = model.peft_config["default"]
    return cfg.lora_alpha / (cfg.r**0.5 if cfg.use_rslora else cfg.r)


def merged_state_dict(state: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A PEFT model's full state dict -> the base model's names with the adapters folded in:
    ``W' = W + scale * B @ A`` for each adapted linear layer; the adapter tensors dropped."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in key:
            layer = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            a, b = state.get(f"{layer}.lora_A.default.weight"), state.get(f"{layer}.lora_B.default.weight")
            if key.endswith(".weight") and a is not None and b is not None:
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        out[name] = value
    return out
