"""Old log-probs from the update's own forward: REINFORCE++ at the cost of its math.

The training step (docs/lm.md, "The training step and its batch sizes") computes
``old_logprobs`` with a no-gradient forward before the advantages, because REINFORCE++ puts
the KL in the token rewards,
``r[i,t] = -beta * (old_logp - ref_logp)[i,t] (+ R_i on the last token)``, so the advantages
need them. When the rollout is used once (one epoch, one mini-batch per step), the update
starts from the very weights that produced the rollout, and its first forward computes exactly
those log-probs. So the update's forward runs first, with its graph; its detached log-probs are
the ``old_logprobs`` of the KL reward and the advantages; then the policy loss is built on the
same forward and takes the backward. One forward instead of two, equal results (tested against
the separate pass): ``ratio = exp(logp - old_logp) = 1`` either way.

The price is memory: the graphs of all the rollout's micro-batches are held until the
advantages exist. With ``fuse_old_logprobs = None`` (auto) the trainer fuses only when the
rollout is one micro-batch, where nothing extra is held.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .batch import PromptResponseBatch
from .logprobs import TokenLogprobs


def fuse_old_logprobs(setting: bool | None, on_policy: bool, needs_old_logprobs: bool, rollout_size: int,
                      micro_batch_size: int) -> bool:
    """Whether this run takes ``old_logprobs`` from the update's forward.

    Args:
        setting: the config's ``fuse_old_logprobs``: True, False or None (auto: only when the
            rollout is a single micro-batch).
        on_policy: one epoch of one mini-batch per rollout.
        needs_old_logprobs: the advantages need them (KL placed in the reward).
    """
    if not (on_policy and needs_old_logprobs) or setting is False:
        return False
    return setting is True or rollout_size <= micro_batch_size


class HeldForwards:
    """The update's forwards (with their graphs), run before the advantages are known.

    :meth:`run` does them micro-batch by micro-batch, exactly as the update will split the
    rollout, and returns the detached log-probs; :meth:`take` hands each one to the update's
    loss, checking that it is the batch the forward was run on.
    """

    def __init__(self) -> None:
        self._held: list[tuple[Tensor, TokenLogprobs]] = []

    def __len__(self) -> int:
        return len(self._held)

    def run(self, forward: Callable[[PromptResponseBatch], TokenLogprobs], batch: PromptResponseBatch,
            micro: list[list[int]]) -> Tensor:
        """``forward`` over ``batch`` in the micro-batches ``micro`` (row indices; graphs kept).

        Returns:
            ``(N, T)`` float32 ``old_logprobs`` on the CPU, detached.
        """
        self._held = []
        old = torch.zeros(batch.response_mask.shape)
        for rows in micro:
            index = torch.tensor(rows, dtype=torch.long)
            part = batch.select(index)
            out = forward(part)
            self._held.append((part.input_ids, out))
            old[index] = out.logprobs.detach().float().cpu()
        return old

    def take(self, input_ids: Tensor) -> TokenLogprobs | None:
        """The held forward of the micro-batch ``input_ids``, or None (then nothing is held any
        more: a batch that does not match means the update is splitting differently)."""
        if not self._held:
            return None
        ids, out = self._held.pop(0)
        if ids.shape != input_ids.shape or not torch.equal(ids, input_ids.to(ids.device)):
            self._held = []
            return None
        return out

    def clear(self) -> None:
        self._held = []
