"""Process (per-token or per-step) rewards: a reward function that returns a list per completion
instead of one number. This module turns those lists into one reward per response token, which
the core adds to the token rewards (``step_rewards`` of :func:`reinforcepp.core.token_rewards`):

    r[i, t] = -beta kl[i, t] + R_i [t == last_i] + sum_s w_s p_s[i, t]

- per token (``step_delimiter=None``): the list holds one reward per completion token, aligned
  with ``completion_ids`` (the EOS token included when one was generated);
- per step (``step_delimiter="\\n\\n"`` say): the completion text is split at the delimiter
  (``text.split(delimiter)``, an empty piece after a trailing delimiter ignored); the list holds
  one reward per step, placed on the token where the step's text ends (the delimiter belongs to
  the step it closes); the last step's reward goes on the last token, where the scalar reward
  goes too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import RewardError


def step_end_tokens(
    text: str, token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], delimiter: str
) -> list[int]:
    """Token index where each step of ``text`` ends.

    ``decode(ids)`` must decode a token prefix the way ``text`` was decoded (so that
    ``decode(token_ids) == text``). Step ``j`` ends at the first token ``m`` whose prefix
    ``decode(token_ids[:m + 1])`` is at least as long as the text up to the step's end
    (binary search; a prefix decode is monotone in length). The last step ends at the last
    token.
    """
    pieces = text.split(delimiter)
    if len(pieces) > 1 and pieces[-1] == "":
        pieces = pieces[:-1]
    ends: list[int] = []
    offset = 0
    for j, piece in enumerate(pieces):
        if j == len(pieces) - 1:
            ends.append(len(token_ids) - 1)
            break
        offset += len(piece) + len(delimiter)
        lo, hi = 0, len(token_ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(token_ids[: mid + 1])) >= offset:
                hi = mid
            else:
                lo = mid + 1
        ends.append(lo)
    return ends


def process_token_rewards(
    values: Sequence[float],
    text: str,
    token_ids: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    delimiter: str | None,
    where: str,
) -> list[float]:
    """One response's process reward as one reward per token (``len(token_ids)`` floats).

    Raises:
        RewardError: the list's length is neither the number of tokens (per token) nor the
            number of steps (per step); the message names ``where``.
    """
    n_tokens = len(token_ids)
    if delimiter is None:
        if len(values) != n_tokens:
            raise RewardError(
                f"{where} returned {len(values)} per-token rewards for a completion of {n_tokens} tokens "
                "(one per completion_ids entry; for one reward per step set reward_step_delimiter)"
            )
        return [float(v) for v in values]
    ends = step_end_tokens(text, token_ids, decode, delimiter)
    if len(values) != len(ends):
        raise RewardError(
            f"{where} returned {len(values)} step rewards for a completion of {len(ends)} steps "
            f"(split at reward_step_delimiter={delimiter!r})"
        )
    out = [0.0] * n_tokens
    for end, v in zip(ends, values):
        out[end] += float(v)
    return out
