"""Loading the policy, the frozen reference and the critic (``gae`` only)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..engines import position_ids_from_mask


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_torch_threads(threads: int) -> int:
    """``torch.set_num_threads``: ``threads``, or for 0 one per physical core (half the logical
    CPUs; more threads than cores make small models slower, not faster). Returns the number."""
    n = threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(n)
    return n


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


MODEL_FILES = {"model": "config.json", "tokenizer": "tokenizer_config.json"}


def check_model_source(key: str, value: str, kind: str = "model") -> None:
    """One line (:class:`~reinforcepp.errors.InputError`) naming ``key`` when ``value`` cannot be
    the local ``kind`` ("model" or "tokenizer") it names: a file, a folder without
    ``config.json`` (a tokenizer: ``tokenizer_config.json`` or ``tokenizer.json``), or a path
    that does not exist. Anything else (``gpt2``, ``org/model``) is left to the hub."""
    from ..errors import InputError

    path = Path(value).expanduser()
    what = "a Hugging Face model folder holds config.json and the weights" if kind == "model" else \
        "a tokenizer folder holds tokenizer_config.json or tokenizer.json"
    if path.is_dir():
        needed = [MODEL_FILES[kind]] + (["tokenizer.json"] if kind == "tokenizer" else [])
        if not any((path / name).is_file() for name in needed):
            found = sorted(p.name for p in path.iterdir())[:5]
            raise InputError(f"{key}={value}: not a {kind} folder: no {' or '.join(needed)} in it ({what}; "
                             f"it holds {', '.join(found) or 'nothing'})")
    elif path.exists():
        raise InputError(f"{key}={value}: a file, not a {kind} folder ({what})")
    elif value.startswith((".", "/", "~")) or value.count("/") > 1 or not value.strip():
        raise InputError(f"{key}={value}: no such {kind} folder (cwd {Path.cwd()}); "
                         "give a local folder or a hub name 'org/model'")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """``AutoTokenizer`` with left padding and a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token: responses could never end")
    return tok


def load_causal_lm(
    name_or_path: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
    safetensors_only: bool = False,
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained``; ``safetensors_only`` (models in a run directory,
    which reinforcepp always writes as safetensors) refuses pickle weight files."""
    from transformers import AutoModelForCausalLM

    extra = {"use_safetensors": True} if safetensors_only else {}
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **extra
    )
    return realign(torch.nn.Module.to(model, device))


ALIGNMENT = 64


def realign(model: torch.nn.Module) -> torch.nn.Module:
    """Move every CPU parameter and buffer that does not start on a 64-byte boundary into fresh
    (aligned) memory, in place.

    ``from_pretrained`` memory-maps safetensors files, so loaded tensors sit at file offsets
    (often 24 mod 64). CPU matmul kernels round differently for unaligned inputs, so a model
    loaded from a checkpoint computed log-probs that differed from the in-memory model's in the
    last bits (1e-7), and a resumed run drifted from the uninterrupted one. Aligned copies give
    bit-identical forward passes (and no longer pin the checkpoint file)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % ALIGNMENT:
                tensor.data = tensor.data.clone()
    return model


def context_length(model: torch.nn.Module) -> Optional[int]:
    """The model's context in tokens (``max_position_embeddings`` or the like), if it says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_limit(model: torch.nn.Module, max_prompt_length: int, max_new_tokens: int) -> int:
    """Tokens a prompt may have: ``max_prompt_length``, and no more than the model's context
    leaves after ``max_new_tokens`` (a longer one would run past the position embeddings)."""
    context = context_length(model)
    if context is None:
        return max_prompt_length
    if max_new_tokens >= context:
        from ..config import ConfigError

        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens"
        )
    return min(max_prompt_length, context - max_new_tokens)


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass instead of keeping them (non-reentrant
    ``torch.utils.checkpoint``), on a Hugging Face model or a PEFT wrapper of one.

    Newer transformers releases (5.25, the newest we support) name this
    ``activation_checkpointing_enable`` and keep ``gradient_checkpointing_enable`` as a deprecated
    alias (removed in v6); the older ones (5.4, our floor) know only ``gradient_checkpointing_enable``.
    Call this rather than either name."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Inference-only: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    return frozen(copy.deepcopy(model))


class ValueModel(torch.nn.Module):
    """A critic: a causal LM's backbone plus a scalar head, ``V(s_t)`` for each response token.

    ``V`` at response position ``t`` is read from the hidden state that predicts token ``t``
    (the state before the token is chosen), the same positions the log-probs use.
    """

    def __init__(self, backbone: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_causal_lm(cls, lm: Any) -> "ValueModel":
        """A critic on a deep copy of ``lm``'s backbone (the LM head is dropped)."""
        backbone = copy.deepcopy(lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model)
        backbone.requires_grad_(True)
        return cls(backbone, lm.config.hidden_size).to(next(lm.parameters()).device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_length: int, packed: bool = False) -> Tensor:
        """``(B, P + T)`` -> ``(B, T)`` float32 values; ``packed``: computed on one packed row
        (:func:`~.packing.packed_hidden`), 0 after each response's end."""
        if packed:
            from .packing import packed_hidden

            h, rows, cols = packed_hidden(self.backbone, input_ids, attention_mask, response_length)
            values = torch.zeros(input_ids.shape[0], response_length, device=input_ids.device)
            head = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()
            return values.index_put((rows, cols), head)
        positions = position_ids_from_mask(attention_mask)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
        ).last_hidden_state
        h = hidden[:, -response_length - 1 : -1]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()


def load_critic(
    name_or_path: Optional[str], policy: torch.nn.Module, *, dtype: torch.dtype, device: torch.device,
    trust_remote_code: bool = False,
) -> ValueModel:
    if name_or_path is None:
        return ValueModel.from_causal_lm(policy)
    check_model_source("critic_model", name_or_path)
    lm = load_causal_lm(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return ValueModel.from_causal_lm(lm)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")


def weights_fingerprint(directory: str) -> dict[str, str]:
    """sha256 of every weight and config file of a model directory (``*.safetensors``,
    ``*.bin``, ``*.pt``, ``*.pth``, ``*.json``), by file name: what must not change for the
    directory to load into the same model."""
    import hashlib

    out = {}
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            out[path.name] = h.hexdigest()
    return out
