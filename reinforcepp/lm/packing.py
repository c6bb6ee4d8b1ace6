"""Packing: token-budget micro-batches, and one forward over several sequences laid in one row.

The padded update (``response_logprobs``) cuts a window into micro-batches of ``micro_batch_size``
responses, each a ``(b, P + T)`` block padded to the longest prompt and response of the rollout.
With a long tail of answer lengths most of that block is padding. Here instead:

* :mod:`.micro_batches` cuts the window into micro-batches of at most ``micro_batch_tokens``
  real tokens (balanced, a prompt's samples kept together when they share the prompt), and
  gives every rank the same number of them.
* :func:`packed_response_logprobs` runs a micro-batch as ONE row with no padding: the sequences
  one after the other, positions restarting at 0 for each, attention kept inside each sequence.
  With ``share_prompt`` a prompt's ``k`` samples become one tree ``[prompt | y_1 | ... | y_k]``,
  each response attending to the prompt and to itself only. It returns the ``(N, T)`` log-probs
  (and entropy) of :func:`~reinforcepp.lm.logprobs.response_logprobs`, same chunked float32
  log-softmax and temperature, so the loss does not change.

How attention is kept inside a sequence depends on the model's attention implementation
(:func:`packed_attention_method`): ``sdpa`` and ``eager`` get an explicit ``(1, 1, L, L)``
block-causal mask (a tree mask with ``share_prompt``); ``flex_attention`` a ``BlockMask`` with the
same rule; ``flash_attention_2``/``_3`` the sequences' boundaries (``cu_seq_lens``) of the varlen
kernel, which cannot express a tree (``share_prompt`` is refused there). The flash path is not
run by the tests (no GPU here). The dense mask costs ``L^2`` booleans and its attention ``L^2``
scores per micro-batch where the padded layout computes ``b * (P + T)^2``: the budget bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor

from ..engines.kv_cache import unwrap
from .logprobs import TokenLogprobs, logprobs_from_logits
from .micro_batches import prompt_groups, sequence_lengths

AttentionMethod = Literal["mask", "position_ids", "flex", "varlen"]

PACKABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3")
"""Architectures whose packed forward is tested against the padded one (tests/lm/test_packing.py):
rotary positions from ``position_ids``, every layer's attention masked by the mask we hand in."""

_METHODS: dict[str, tuple[AttentionMethod, ...]] = {
    # attn_implementation -> the methods that restrict its attention per sequence; the first is the default
    "sdpa": ("mask", "position_ids"),
    "eager": ("mask", "position_ids"),
    "flex_attention": ("flex", "position_ids"),
    "flash_attention_2": ("varlen",),
    "flash_attention_3": ("varlen",),
}
_TREE_METHODS = ("mask", "flex")  # the others only separate sequences, a shared prompt needs a tree


# ---------------------------------------------------------------------------------------------------------- layout
@dataclass
class PackedLayout:
    """``N`` rows of a ``[prompt | response]`` batch laid in one row of ``L`` real tokens."""

    source: Tensor
    """``(L,)`` index into the flattened ``(N * (P + T))`` input of each packed token."""
    position_ids: Tensor
    """``(L,)`` position of each token in its own sequence (restarting at 0 for each)."""
    sequence: Tensor
    """``(L,)`` which packed sequence a token belongs to: a row, or with a shared prompt a group."""
    branch: Tensor
    """``(L,)`` 0 on a sequence's trunk (the prompt, and the response when the prompt is not
    shared), ``j >= 1`` on the ``j``-th response of a shared prompt."""
    logit_index: Tensor
    """``(M,)`` packed positions whose logits predict the response tokens, ``M = sum_i r_i``."""
    rows: Tensor
    """``(M,)`` row of each predicted response token."""
    cols: Tensor
    """``(M,)`` response column ``t`` of each predicted token."""
    sequence_lengths: list[int]
    """tokens of each packed sequence (a tree's prompt and all its responses count once)."""


def pack_layout(
    attention_mask: Tensor, response_length: int, *, groups: Optional[Sequence[int]] = None
) -> PackedLayout:
    """The packed layout of a batch: for each row ``[prompt | response]`` (real tokens only), or
    with ``groups`` for each group ``[prompt | y_1 | ... | y_k]`` in order of first appearance,
    its responses in row order. Positions restart at 0 per sequence and continue from the prompt
    into every response (``p, ..., p + r_j - 1``). Token ``y_t`` of a response is predicted by
    the packed position of ``y_{t-1}``, and ``y_0`` by the prompt's last token. Built on the CPU."""
    prompt, response = sequence_lengths(attention_mask, response_length)
    width = attention_mask.shape[1]
    p_col = width - response_length
    if any(p == 0 for p in prompt):
        raise ValueError(f"row {prompt.index(0)} has an empty prompt: nothing predicts its first response token")
    if groups is None:
        order = [[i] for i in range(len(prompt))]
    else:
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        order = list(members.values())
    source, positions, sequence, branch, logit_index, rows, cols, lengths = [], [], [], [], [], [], [], []
    offset = 0
    for s, members_ in enumerate(order):
        head = members_[0]
        p = prompt[head]
        source.append(head * width + torch.arange(p_col - p, p_col))
        positions.append(torch.arange(p))
        branch.append(torch.zeros(p, dtype=torch.long))
        start = offset
        offset += p
        prompt_end = offset - 1
        for j, i in enumerate(members_):
            r = response[i]
            source.append(i * width + p_col + torch.arange(r))
            positions.append(torch.arange(p, p + r))
            branch.append(torch.full((r,), 0 if groups is None else j + 1))
            if r:
                logit_index.append(torch.cat([torch.tensor([prompt_end]), offset + torch.arange(r - 1)]))
                rows.append(torch.full((r,), i))
                cols.append(torch.arange(r))
            offset += r
        sequence.append(torch.full((offset - start,), s))
        lengths.append(offset - start)
    cat = lambda parts: torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return PackedLayout(
        cat(source), cat(positions), cat(sequence), cat(branch), cat(logit_index), cat(rows), cat(cols), lengths
    )


def block_causal_mask(sequence: Tensor, branch: Tensor) -> Tensor:
    """``(L, L)`` boolean: token ``q`` attends to token ``k`` when ``k <= q``, both are in the same
    packed sequence, and ``k`` is on the trunk or on ``q``'s own branch. Without branches this is
    the block-diagonal causal mask of packed sequences; with them, a prompt's tree."""
    idx = torch.arange(sequence.shape[0], device=sequence.device)
    same = sequence[:, None] == sequence[None, :]
    visible = (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
    return same & visible & (idx[None, :] <= idx[:, None])


# ---------------------------------------------------------------------------------------------------------- forward
def packed_attention_method(
    model: torch.nn.Module, *, tree: bool = False, method: Optional[AttentionMethod] = None
) -> AttentionMethod:
    """The way the packed forward keeps ``model``'s attention inside each sequence, after
    checking it can: ``method`` when given, else the default of its attention implementation
    (sdpa, eager: ``"mask"``; flex_attention: ``"flex"``; flash_attention_2/3: ``"varlen"``;
    sdpa, eager and flex_attention also take ``"position_ids"``, transformers' own detection of
    packed rows from restarting positions, which cannot express a tree).

    Raises:
        ValueError: naming the model type, for an architecture whose packed forward is not tested
            (:data:`PACKABLE_MODEL_TYPES`), an attention implementation without a per-sequence
            mask, sliding-window layers (a mask we hand in would replace their window), or a tree
            (``share_prompt``) asked of a method that cannot express one.
    """
    config = unwrap(model).config
    model_type = getattr(config, "model_type", type(unwrap(model)).__name__)
    impl = getattr(config, "_attn_implementation", None)
    who = f"packed forward: model type {model_type!r}"
    if model_type not in PACKABLE_MODEL_TYPES:
        raise ValueError(f"{who} is not one of the tested architectures {PACKABLE_MODEL_TYPES}")
    who += f" with attn_implementation={impl!r}"
    if impl not in _METHODS:
        raise ValueError(f"{who} cannot be restricted per sequence; use one of {tuple(_METHODS)}")
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = any(t != "full_attention" for t in layer_types) or (
        not layer_types and getattr(config, "sliding_window", None) is not None
    )
    if sliding:
        raise ValueError(f"{who} has sliding-window attention layers, which the packed mask would override")
    methods = _METHODS[impl]
    if method is not None and method not in methods:
        raise ValueError(f"{who} takes attention method {methods}, not {method!r}")
    if tree:
        methods = tuple(m for m in ((method,) if method else methods) if m in _TREE_METHODS)
        if not methods:
            raise ValueError(
                f"{who} cannot attend a shared prompt from several responses in one row with method "
                f"{method or _METHODS[impl][0]!r} (it separates sequences only); set share_prompt=false"
            )
    return method or methods[0]


def _attention_kwargs(
    model: torch.nn.Module, layout: PackedLayout, method: AttentionMethod, device: torch.device
) -> dict[str, Any]:
    if method == "position_ids":
        return {"attention_mask": None}  # transformers' masking utils split the row where the positions restart
    if method == "varlen":  # flash-attention's varlen kernel, the sequences' boundaries given (not run here: no GPU)
        bounds = torch.tensor([0, *layout.sequence_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        longest = max(layout.sequence_lengths)
        return {
            "attention_mask": None,
            "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds,
            "max_length_q": longest,
            "max_length_k": longest,
        }
    sequence, branch = layout.sequence.to(device), layout.branch.to(device)
    if method == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            visible = (branch[k] == 0) | (branch[k] == branch[q])
            return (sequence[q] == sequence[k]) & visible & (k <= q)

        n = sequence.shape[0]
        return {"attention_mask": create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device.type)}
    allowed = block_causal_mask(sequence, branch)[None, None]
    if getattr(unwrap(model).config, "_attn_implementation", None) == "eager":  # eager adds the mask to the scores
        dtype = unwrap(model).get_input_embeddings().weight.dtype
        return {
            "attention_mask": torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        }
    return {"attention_mask": allowed}


def packed_response_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_length: int,
    *,
    with_entropy: bool = False,
    chunk_size: int = 64,
    temperature: float = 1.0,
    entropy_grad: bool = True,
    share_prompt: bool = False,
    method: Optional[AttentionMethod] = None,
) -> TokenLogprobs:
    """:func:`~reinforcepp.lm.logprobs.response_logprobs` computed on one packed row.

    The ``N`` rows' real tokens are laid one sequence after another (:func:`pack_layout`),
    positions restarting per sequence, attention kept inside each (:func:`packed_attention_method`);
    with ``share_prompt`` the rows with the same prompt form one tree ``[prompt | y_1 | ... | y_k]``.
    Only the ``M = sum_i r_i`` positions that predict response tokens go through the LM head
    (``logits_to_keep`` as indices), divided by ``temperature``, and the same chunked float32
    ``log p(y_t) = z_t[y_t] - logsumexp(z_t)`` is taken; the values land in the ``(N, T)`` layout.

    Args:
        model: a Hugging Face causal LM (possibly wrapped: DDP, PEFT, ``torch.compile``).
        input_ids, attention_mask: ``(N, P + T)``, prompt left-padded, response right-padded.
        response_length: ``T``.
        share_prompt: one tree per distinct prompt (needs a method that can express it).
        method: how attention is restricted; ``None`` = the default of the model's attention
            implementation (:func:`packed_attention_method`).
    Returns:
        :class:`TokenLogprobs` with ``(N, T)`` float32 tensors, 0 after each response's end. An
        empty batch gives ``(0, T)`` tensors without calling the model (under FSDP the trainer
        must still run a forward for it, see :func:`split_to_count`).
    """
    groups = prompt_groups(input_ids, response_length) if share_prompt else None
    tree = groups is not None and len(set(groups)) < len(groups)  # no repeated prompt: plain packing is as cheap
    method = packed_attention_method(model, tree=tree, method=method)
    layout = pack_layout(attention_mask, response_length, groups=groups if tree else None)
    device = input_ids.device
    n, t = input_ids.shape[0], response_length
    logprobs = torch.zeros(n, t, device=device)
    entropy = torch.zeros(n, t, device=device) if with_entropy else None
    if layout.logit_index.numel() == 0:
        return TokenLogprobs(logprobs, entropy)
    ids = input_ids.reshape(-1)[layout.source.to(device)][None]
    out = model(
        input_ids=ids,
        position_ids=layout.position_ids.to(device)[None],
        logits_to_keep=layout.logit_index.to(device),
        use_cache=False,
        **_attention_kwargs(model, layout, method, device),
    )
    logits = out.logits
    if temperature != 1.0:
        logits = logits / temperature
    rows, cols = layout.rows.to(device), layout.cols.to(device)
    targets = input_ids[:, -t:][rows, cols][None]
    flat = logprobs_from_logits(
        logits, targets, with_entropy=with_entropy, chunk_size=chunk_size, entropy_grad=entropy_grad
    )
    logprobs = logprobs.index_put((rows, cols), flat.logprobs[0])
    if with_entropy:
        assert entropy is not None and flat.entropy is not None
        entropy = entropy.index_put((rows, cols), flat.entropy[0])
    return TokenLogprobs(logprobs, entropy)


def packed_hidden(backbone: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                  response_length: int) -> tuple[Tensor, Tensor, Tensor]:
    """The decoder ``backbone``'s last hidden states at the packed positions that predict the
    response tokens (what a critic's value head reads), on one packed row: ``(M, H)`` and the
    ``(M,)`` row and column of each in the ``(N, T)`` layout."""
    method = packed_attention_method(backbone)
    layout = pack_layout(attention_mask, response_length)
    device = input_ids.device
    rows, cols = layout.rows.to(device), layout.cols.to(device)
    if layout.logit_index.numel() == 0:
        return torch.zeros(0, unwrap(backbone).config.hidden_size, device=device), rows, cols
    ids = input_ids.reshape(-1)[layout.source.to(device)][None]
    hidden = backbone(input_ids=ids, position_ids=layout.position_ids.to(device)[None], use_cache=False,
                      **_attention_kwargs(backbone, layout, method, device)).last_hidden_state
    return hidden[0, layout.logit_index.to(device)], rows, cols


def check_packing(config: Any, models: Any, sampler: Any, train: Any, episodes: bool) -> None:
    """Before training: ``pack_sequences`` on models whose attention it can restrict per sequence
    (the policy, a local reference, the critic), and ``micro_batch_tokens`` at least the longest
    sequence the run can make: the longest training prompt (tokenised once, through the
    sampler's cache) plus ``max_new_tokens`` (multi-turn: ``max_turns`` of them, each followed by
    an observation of up to ``max_observation_tokens``). One line each (ConfigError)."""
    from ..config import ConfigError

    if config.pack_sequences:
        for name, model in (("policy", models.policy), ("reference", models.reference), ("critic", models.critic)):
            if isinstance(model, torch.nn.Module) and any(True for _ in model.parameters()):
                target = getattr(unwrap(model), "backbone", model)
                try:
                    packed_attention_method(target, tree=config.share_prompt and name != "critic")
                except ValueError as e:
                    raise ConfigError(f"pack_sequences=true, the {name}: {e}") from None
    if config.micro_batch_tokens is None or train is None:
        return
    prompts = {sampler.render(p) for p in train[config.prompt_column]}
    longest_prompt = max(len(sampler.encode_prompt(text)) for text in prompts)
    turns = config.max_turns if episodes else 1
    longest = longest_prompt + turns * config.max_new_tokens + (turns - 1) * config.max_observation_tokens
    if config.micro_batch_tokens < longest:
        raise ConfigError(f"micro_batch_tokens={config.micro_batch_tokens} is smaller than the longest sequence this "
                          f"run can make, {longest} tokens (the longest training prompt, {longest_prompt}, "
                          f"+ max_new_tokens={config.max_new_tokens}"
                          f"{f' x max_turns={turns} and the observations' if episodes else ''}): "
                          f"raise it to at least {longest}")
