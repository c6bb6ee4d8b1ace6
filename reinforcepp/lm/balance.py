"""Spreading a step's groups over the ranks by tokens (``micro_batch_tokens`` under torchrun).

Each rank samples its own prompts, so with a long tail of answer lengths one rank may hold far
more tokens than another and the others wait for it at every collective. Before the forwards,
the ranks exchange their groups so that each holds about the same number of tokens
(:func:`assign_groups`: largest first to the least-loaded rank with room, every rank keeping its
number of groups). Nothing in the math moves: a group stays whole (group baselines), whitening
and the loss normalisers are sums over every rank, so the gradient is the same wherever a group
is computed.
"""

from __future__ import annotations

from typing import Any, Sequence


def assign_groups(costs: Sequence[Sequence[int]]) -> list[list[tuple[int, int]]]:
    """Rank ``r`` holds groups of token counts ``costs[r]``; returns, for each rank, the
    ``(source rank, group index)`` pairs it holds after balancing. Every rank keeps as many
    groups as it had, and a group moves only to even the loads out: starting from where the
    groups are, the heaviest and the lightest rank swap the pair of groups that brings their
    loads closest, while a swap narrows their gap (ties: the first pair in rank and index
    order). Deterministic: every rank computes the same assignment from the same gathered counts."""
    held = [[(r, i) for i in range(len(c))] for r, c in enumerate(costs)]
    cost = lambda pair: costs[pair[0]][pair[1]]  # noqa: E731
    for _ in range(sum(len(c) for c in costs) * len(costs)):  # each swap narrows a gap; bounded all the same
        loads = [sum(cost(p) for p in pairs) for pairs in held]
        heavy = max(range(len(held)), key=lambda r: (loads[r], -r))
        light = min(range(len(held)), key=lambda r: (loads[r], r))
        gap = loads[heavy] - loads[light]
        best: tuple[int, int, int] | None = None  # (new gap, index in heavy, index in light)
        for a, pa in enumerate(held[heavy]):
            for b, pb in enumerate(held[light]):
                d = cost(pa) - cost(pb)
                if 0 < d < gap and (best is None or abs(gap - 2 * d) < best[0]):
                    best = (abs(gap - 2 * d), a, b)
        if best is None:
            break
        _, a, b = best
        held[heavy][a], held[light][b] = held[light][b], held[heavy][a]
    return [sorted(pairs) for pairs in held]


def group_tokens(rollout: Any, k: int, share_prompt: bool) -> list[int]:
    """Tokens each group of ``k`` responses computes: its prompt (once with ``share_prompt``,
    else once per response) and its responses."""
    gen = rollout.generation
    out = []
    for start in range(0, len(gen.response_ids), k):
        prompts = [len(gen.prompt_ids[i]) for i in range(start, start + k)]
        responses = sum(len(gen.response_ids[i]) for i in range(start, start + k))
        out.append((prompts[0] if share_prompt else sum(prompts)) + responses)
    return out


def balance_ranks(rollout: Any, dist: Any, k: int, share_prompt: bool) -> Any:
    """This rank's rollout after the groups of every rank are spread by tokens
    (:func:`assign_groups`). ``rollout.counts`` (what this rank dropped or filtered) stay."""
    import torch.distributed as torch_dist

    from .rollout import Rollout

    costs: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(costs, group_tokens(rollout, k, share_prompt))
    assignment = assign_groups(costs)
    if all(pairs == [(r, i) for i in range(len(costs[r]))] for r, pairs in enumerate(assignment)):
        return rollout  # already balanced: every rank keeps its own (they all see the same assignment)
    everyone: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(everyone, rollout)
    parts = [everyone[r].take(list(range(i * k, (i + 1) * k))) for r, i in assignment[dist.rank]]
    return Rollout.concat(parts, rollout.counts)
