"""Micro-batches by a token budget, and the padding they compute (``micro_batch_tokens``).

The padded update cuts a window into micro-batches of ``micro_batch_size`` responses, each a
``(b, P + T)`` block padded to the longest prompt and response. :func:`plan_micro_batches` cuts it
instead into micro-batches of at most ``micro_batch_tokens`` real tokens (balanced, a prompt's
samples kept together when they share the prompt), and :func:`split_to_count` gives every rank the
same number of them (FSDP runs one forward per micro-batch on every rank, in step).
:func:`padding_fraction` measures the share of the computed tokens that are padding
(``update/padding_fraction``). The packed forward that computes no padding is :mod:`.packing`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor


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


def plan(attention_mask: Tensor, input_ids: Tensor, response_length: int, *, micro_batch_size: int,
         micro_batch_tokens: Optional[int], share_prompt: bool,
         count: Optional[Callable[[int], int]] = None) -> list[list[int]]:
    """The micro-batches of a batch of ``N`` rows: consecutive runs of ``micro_batch_size`` rows,
    or with ``micro_batch_tokens`` :func:`plan_micro_batches` (prompt groups kept together and
    counted once with ``share_prompt``). ``count(n)``: the number of micro-batches every rank
    must run given this rank's ``n`` (the maximum over ranks, under torchrun); the plan is split
    to it (:func:`split_to_count`), which may leave empty micro-batches."""
    n = attention_mask.shape[0]
    if micro_batch_tokens is None:
        micro = [list(range(s, min(s + micro_batch_size, n))) for s in range(0, n, micro_batch_size)]
        groups = None
    else:
        prompt, response = sequence_lengths(attention_mask, response_length)
        groups = prompt_groups(input_ids, response_length) if share_prompt else None
        micro = plan_micro_batches(prompt, response, micro_batch_tokens, groups=groups) if n else []
    if count is None or micro_batch_tokens is None:
        return micro
    wanted = count(len(micro))
    if wanted <= len(micro):
        return micro
    prompt, response = sequence_lengths(attention_mask, response_length)
    return split_to_count(micro, wanted, prompt, response, groups=groups)


def micro_batches_of(batch: Any, config: Any, dist: Any) -> list[list[int]]:
    """The micro-batches of ``batch`` (a ``PromptResponseBatch``) under ``config``
    (``micro_batch_size`` or ``micro_batch_tokens``, ``share_prompt``), the same number on every
    rank under torchrun (FSDP runs one forward per micro-batch on every rank, in step)."""
    count = (lambda n: int(dist.max(float(n)))) if dist.enabled else None
    return plan(batch.attention_mask, batch.input_ids, batch.response_length, micro_batch_size=config.micro_batch_size,
                micro_batch_tokens=config.micro_batch_tokens, share_prompt=config.share_prompt, count=count)
