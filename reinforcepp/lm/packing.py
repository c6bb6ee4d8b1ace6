"""Packing: token-budget micro-batches, and one forward over several sequences laid in one row.

The padded update (``response_logprobs``) cuts a window into micro-batches of ``micro_batch_size``
responses, each a ``(b, P + T)`` block padded to the longest prompt and response of the rollout.
With a long tail of answer lengths most of that block is padding. Here instead:

* :func:`plan_micro_batches` cuts the window into micro-batches of at most ``micro_batch_tokens``
  real tokens (balanced, a prompt's samples kept together when they share the prompt), and
  :func:`split_to_count` gives every rank the same number of them (FSDP runs one forward per
  micro-batch on every rank, in step).
* :func:`packed_response_logprobs` runs a micro-batch as ONE row with no padding: the sequences
  one after the other, positions restarting at 0 for each, attention kept inside each sequence.
  With ``share_prompt`` a prompt's ``k`` samples become one tree ``[prompt | y_1 | ... | y_k]``,
  each response attending to the prompt and to itself only. It returns the ``(N, T)`` log-probs
  (and entropy) of :func:`~reinforcepp.lm.logprobs.response_logprobs`, same chunked float32
  log-softmax and temperature, so the loss does not change.
* :func:`padding_fraction` measures the share of the computed tokens that are padding.

How attention is kept inside a sequence depends on the model's attention implementation
(:func:`packed_attention_method`): ``sdpa`` and ``eager`` get an explicit ``(1, 1, L, L)``
block-causal mask (a tree mask with ``share_prompt``); ``flex_attention`` a ``BlockMask`` with the
same rule; ``flash_attention_2``/``_3`` the sequences' boundaries (``cu_seq_lens``) of the varlen
kernel, which cannot express a tree (``share_prompt`` is refused there). The flash path is not
run by the tests (no GPU here). The dense mask costs ``L^2`` booleans and its attention ``L^2``
scores per micro-batch where the padded layout computes ``b * (P + T)^2``: the budget bounds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .kv_cache import _inner
from .logprobs import TokenLogprobs, logprobs_from_logits

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


# ---------------------------------------------------------------------------------------------------------- planning
def sequence_lengths(attention_mask: Tensor, response_length: int) -> tuple[list[int], list[int]]:
    """Real prompt and response lengths of each row of a ``[prompt | response]`` batch.

    Args:
        attention_mask: ``(N, P + T)``, 1 on real tokens: a left-padded prompt, a right-padded
            response (observation tokens of multi-turn episodes are real: 1 here, 0 in ``response_mask``).
        response_length: ``T``.
    Returns:
        ``(prompt_lengths, response_lengths)``, ``N`` ints each.
    """
    mask = attention_mask.detach().to("cpu", torch.long)
    p = mask.shape[1] - response_length
    prompt, response = mask[:, :p].sum(1), mask[:, p:].sum(1)
    cols = torch.arange(mask.shape[1])
    expected = ((cols >= p - prompt[:, None]) & (cols < p + response[:, None])).long()
    if not torch.equal(mask, expected):
        bad = int((mask != expected).any(1).nonzero()[0])
        raise ValueError(f"row {bad} of the attention mask is not a left-padded prompt then a right-padded response")
    return prompt.tolist(), response.tolist()


def prompt_groups(input_ids: Tensor, response_length: int) -> list[int]:
    """Group id of each row: rows with the same (left-padded) prompt tokens share an id, numbered
    in order of first appearance. These are the samples ``share_prompt`` computes the prompt once for."""
    prompts = input_ids[:, : input_ids.shape[1] - response_length].detach().cpu()
    _, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    renumber: dict[int, int] = {}
    return [renumber.setdefault(int(g), len(renumber)) for g in inverse]


def micro_batch_token_count(
    indices: Sequence[int],
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    groups: Optional[Sequence[int]] = None,
) -> int:
    """Tokens the packed forward computes for the rows ``indices``: ``sum_i (p_i + r_i)``, or with
    ``groups`` (prompt sharing) each distinct group's prompt once: ``sum_g p_g + sum_i r_i``."""
    if groups is None:
        return sum(prompt_lengths[i] + response_lengths[i] for i in indices)
    prompts = {groups[i]: prompt_lengths[i] for i in indices}
    return sum(prompts.values()) + sum(response_lengths[i] for i in indices)


class _Unit(NamedTuple):
    rows: list[int]
    tokens: int


def plan_micro_batches(
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    micro_batch_tokens: int,
    *,
    groups: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """Cut ``N`` sequences into micro-batches of at most ``micro_batch_tokens`` tokens each, as few as
    first-fit decreasing needs, their loads as even as the greedy balance makes them.

    A sequence costs ``p_i + r_i`` tokens (:func:`micro_batch_token_count`). With ``groups``
    (prompt sharing) the rows of a group stay in one micro-batch, where its prompt is computed
    once (``p_g + sum r_i``); a group larger than the budget is cut into the fewest parts that fit,
    each computing the prompt once.

    Algorithm: first-fit decreasing (FFD) gives a feasible count ``m_ffd`` (at most
    ``11/9 OPT + 6/9`` bins, Dosa 2007) but fills its first bins and leaves the last nearly
    empty. For ``m`` from ``ceil(total / budget)`` to ``m_ffd``, the longest-processing-time
    greedy (LPT: the largest unit first, each into the least-loaded bin; its largest load is
    within ``4/3 - 1/(3m)`` of the best, Graham 1969) is tried with ``m`` bins and kept at the
    first ``m`` whose loads all fit; if none fits, FFD's bins are kept. So the count is never
    above FFD's, and the loads are even when they can be. Even loads matter for the packed
    forward's peak memory and its ``L^2`` attention term, and for ranks waiting on each other.
    Karmarkar-Karp (verl's choice) balances a fixed ``m`` somewhat better, but it ignores the
    cap just as LPT does, so it would need the same check-and-retry; LPT is kept for being
    short and predictable (tests check its bins by hand).

    Args:
        prompt_lengths, response_lengths: ``N`` real token counts (:func:`sequence_lengths`).
        micro_batch_tokens: the budget, tokens per forward.
        groups: ``N`` group ids (:func:`prompt_groups`), or ``None``: rows independent.
    Returns:
        micro-batches as lists of row indices (ascending), the heaviest first (the allocator
        then reserves its peak at the first forward); every row exactly once.
    Raises:
        ValueError: a sequence (its prompt and response) longer than ``micro_batch_tokens``.
    """
    if micro_batch_tokens <= 0:
        raise ValueError(f"micro_batch_tokens must be positive, got {micro_batch_tokens}")
    units = _units(prompt_lengths, response_lengths, micro_batch_tokens, groups)
    return _sorted_bins(_balanced_bins(units, micro_batch_tokens), prompt_lengths, response_lengths, groups)


def _units(
    prompt_lengths: Sequence[int], response_lengths: Sequence[int], budget: int, groups: Optional[Sequence[int]]
) -> list[_Unit]:
    if len(prompt_lengths) != len(response_lengths) or (groups is not None and len(groups) != len(prompt_lengths)):
        counts = f"{len(prompt_lengths)} prompt lengths, {len(response_lengths)} response lengths"
        raise ValueError(f"{counts}, {len(groups or [])} group ids")
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        if p + r > budget:
            raise ValueError(
                f"sequence {i} has {p + r} tokens ({p} prompt + {r} response), more than micro_batch_tokens={budget}"
            )
    if groups is None:
        return [_Unit([i], p + r) for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths))]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    units = []
    for rows in members.values():
        p = prompt_lengths[rows[0]]
        if any(prompt_lengths[i] != p for i in rows):
            raise ValueError(f"rows {rows} share a group but not a prompt length")
        whole = p + sum(response_lengths[i] for i in rows)
        if whole <= budget:
            units.append(_Unit(rows, whole))
        else:  # the fewest parts that fit, each computing the prompt once
            parts = _first_fit_decreasing([_Unit([i], response_lengths[i]) for i in rows], budget - p)
            units += [_Unit(sorted(rows_), p + load) for rows_, load in parts]
    return units


def _first_fit_decreasing(units: list[_Unit], budget: int) -> list[tuple[list[int], int]]:
    bins: list[tuple[list[int], int]] = []
    for u in sorted(units, key=lambda u: (-u.tokens, u.rows[0])):
        for b, (rows, load) in enumerate(bins):
            if load + u.tokens <= budget:
                bins[b] = (rows + u.rows, load + u.tokens)
                break
        else:
            bins.append((list(u.rows), u.tokens))
    return bins


def _longest_first(units: list[_Unit], m: int) -> list[tuple[list[int], int]]:
    bins: list[tuple[list[int], int]] = [([], 0) for _ in range(m)]
    for u in sorted(units, key=lambda u: (-u.tokens, u.rows[0])):
        b = min(range(m), key=lambda j: (bins[j][1], j))
        bins[b] = (bins[b][0] + u.rows, bins[b][1] + u.tokens)
    return bins


def _balanced_bins(units: list[_Unit], budget: int) -> list[list[int]]:
    if not units:
        return []
    ffd = _first_fit_decreasing(units, budget)
    lowest = max(1, math.ceil(sum(u.tokens for u in units) / budget))
    for m in range(lowest, len(ffd) + 1):
        bins = _longest_first(units, m)
        if max(load for _, load in bins) <= budget and all(rows for rows, _ in bins):
            return [rows for rows, _ in bins]
    return [rows for rows, _ in ffd]


def _sorted_bins(bins: list[list[int]], prompt_lengths, response_lengths, groups) -> list[list[int]]:
    load = lambda rows: micro_batch_token_count(rows, prompt_lengths, response_lengths, groups)  # noqa: E731
    return sorted((sorted(rows) for rows in bins), key=lambda rows: (-load(rows), rows[0] if rows else -1))


def split_to_count(
    micro_batches: Sequence[Sequence[int]],
    count: int,
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    *,
    groups: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """Split micro-batches until there are ``count`` of them: each time the heaviest one that can
    be split is cut in two even halves (whole groups first; a lone group into its rows, each half
    computing the prompt once), so every half stays within the budget the original met.

    Every rank of an FSDP (or DDP) update must run the same number of forwards: a rank plans its
    own window, the ranks agree on ``count = max`` of their plans' lengths (one all-reduce), and
    each calls this. When every micro-batch holds a single row and more are still needed, empty
    micro-batches (``[]``) fill the count: the trainer must run a forward that contributes zero
    to the loss for them (FSDP's collectives need it).

    Args:
        micro_batches: one rank's plan (:func:`plan_micro_batches`).
        count: the number of micro-batches wanted, at least ``len(micro_batches)``.
    Returns:
        ``count`` micro-batches, the heaviest first, the same rows.
    """
    if count < len(micro_batches):
        raise ValueError(f"cannot merge {len(micro_batches)} micro-batches into {count}")
    load = lambda rows: micro_batch_token_count(rows, prompt_lengths, response_lengths, groups)  # noqa: E731
    plan = [list(rows) for rows in micro_batches]
    while len(plan) < count:
        splittable = [rows for rows in plan if len(rows) > 1]
        if not splittable:
            plan.append([])
            continue
        heaviest = max(splittable, key=lambda rows: (load(rows), -rows[0]))
        plan.remove(heaviest)
        plan += _halves(heaviest, prompt_lengths, response_lengths, groups)
    return _sorted_bins(plan, prompt_lengths, response_lengths, groups)


def _halves(rows: list[int], prompt_lengths, response_lengths, groups) -> list[list[int]]:
    if groups is None:
        units = [_Unit([i], prompt_lengths[i] + response_lengths[i]) for i in rows]
    else:
        members: dict[int, list[int]] = {}
        for i in rows:
            members.setdefault(groups[i], []).append(i)
        if len(members) > 1:
            units = [
                _Unit(m, micro_batch_token_count(m, prompt_lengths, response_lengths, groups)) for m in members.values()
            ]
        else:  # one group: its rows, each half computing the prompt once
            units = [_Unit([i], response_lengths[i]) for i in rows]
    return [sorted(half) for half, _ in _longest_first(units, 2)]


def equalize_micro_batch_counts(
    plans: Sequence[Sequence[Sequence[int]]],
    prompt_lengths: Sequence[Sequence[int]],
    response_lengths: Sequence[Sequence[int]],
    *,
    groups: Optional[Sequence[Sequence[int]]] = None,
) -> list[list[list[int]]]:
    """Every rank's plan split (:func:`split_to_count`) to the largest plan's count; rank ``r``'s
    lengths and groups are ``prompt_lengths[r]``, ``response_lengths[r]``, ``groups[r]``. The
    single-process form of what the ranks do with an all-reduce of their counts."""
    count = max((len(p) for p in plans), default=0)
    return [
        split_to_count(
            plan, count, prompt_lengths[r], response_lengths[r], groups=None if groups is None else groups[r]
        )
        for r, plan in enumerate(plans)
    ]


# ---------------------------------------------------------------------------------------------------------- padding
def update_token_counts(
    attention_mask: Tensor,
    response_length: int,
    micro_batches: Sequence[Sequence[int]],
    *,
    packed: bool,
    groups: Optional[Sequence[int]] = None,
) -> tuple[int, int]:
    """``(computed, real)`` tokens of the update's forwards over ``micro_batches``.

    Padded layout (``response_logprobs`` on rows sliced from the ``(N, P + T)`` batch): a
    micro-batch of ``b`` rows computes ``b (P + T)`` tokens, or with prompt sharing (``groups``,
    a group of the micro-batch computing its prompt once, as ``share_prompt`` does when a prompt
    repeats) ``u P + b T`` for its ``u`` distinct prompts. Packed layout: exactly the real tokens.
    Real tokens: :func:`micro_batch_token_count` (the prompt of a group once per micro-batch).
    """
    prompt, response = sequence_lengths(attention_mask, response_length)
    width = attention_mask.shape[1]
    computed = real = 0
    for rows in micro_batches:
        n_real = micro_batch_token_count(rows, prompt, response, groups)
        real += n_real
        if packed:
            computed += n_real
        elif groups is not None and len({groups[i] for i in rows}) < len(rows):
            computed += len({groups[i] for i in rows}) * (width - response_length) + len(rows) * response_length
        else:
            computed += len(rows) * width
    return computed, real


def padding_fraction(
    attention_mask: Tensor,
    response_length: int,
    micro_batches: Sequence[Sequence[int]],
    *,
    packed: bool,
    groups: Optional[Sequence[int]] = None,
) -> float:
    """Padding tokens (computed but not real) over all tokens the update's forwards compute,
    ``1 - real / computed`` (:func:`update_token_counts`); 0 for the packed layout, which
    computes no padding. The trainer logs it as ``update/padding_fraction``."""
    computed, real = update_token_counts(attention_mask, response_length, micro_batches, packed=packed, groups=groups)
    return 1.0 - real / computed if computed else 0.0


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
    config = _inner(model).config
    model_type = getattr(config, "model_type", type(_inner(model)).__name__)
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
    if getattr(_inner(model).config, "_attn_implementation", None) == "eager":  # eager adds the mask to the scores
        dtype = _inner(model).get_input_embeddings().weight.dtype
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
