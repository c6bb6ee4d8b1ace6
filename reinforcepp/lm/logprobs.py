"""Log-probs (and entropy) of response tokens under a causal LM, memory-aware.

A batch is ``input_ids = [prompt (left-padded) | response (right-padded)]`` with the response
starting at the same column for every row. Only the logits that predict response tokens are
computed (``logits_to_keep``), and the float32 normaliser ``logsumexp`` is taken chunk by chunk
over time, so the full-vocabulary float32 log-softmax of the batch never exists at once:
``log p(y_t) = z_t[y_t] - logsumexp(z_t)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..engines import position_ids_from_mask


class TokenLogprobs(NamedTuple):
    logprobs: Tensor
    """``(B, T)`` float32 log-probs of the response tokens (padding positions are garbage; mask them)."""
    entropy: Optional[Tensor]
    """``(B, T)`` float32 entropy of the next-token distribution, when asked for."""
    hidden: Optional[Tensor] = None


def logprobs_from_logits(logits: Tensor, targets: Tensor, *, with_entropy: bool = False, chunk_size: int = 64,
                         entropy_grad: bool = True) -> TokenLogprobs:
    """``(B, T, V)`` logits and ``(B, T)`` targets -> float32 log-probs (and entropy),
    processed ``chunk_size`` time steps at a time. ``entropy_grad=False`` computes the entropy
    without building its graph (when it is only logged)."""
    logps, ents = [], []
    for start in range(0, logits.shape[1], chunk_size):
        z = logits[:, start : start + chunk_size].float()
        lse = torch.logsumexp(z, dim=-1)
        logps.append(z.gather(-1, targets[:, start : start + chunk_size, None]).squeeze(-1) - lse)
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                p = torch.softmax(z, dim=-1)
                ents.append(lse - torch.where(p > 0, p * z, 0.0).sum(-1))
    return TokenLogprobs(torch.cat(logps, 1), torch.cat(ents, 1) if with_entropy else None)


def response_logprobs(
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
) -> TokenLogprobs:
    """Log-probs of the last ``response_length`` tokens of each row.

    Args:
        model: a Hugging Face causal LM.
        input_ids: ``(B, P + T)`` prompt (left-padded) then response (right-padded).
        attention_mask: ``(B, P + T)``.
        response_length: ``T``.
        temperature: logits are divided by it, so the log-probs are those of the sampling
            distribution (as in OpenRLHF and verl).
        share_prompt: run each distinct prompt once and let all its samples attend to the
            shared prompt keys and values (see :func:`shared_prompt_logits`).
    Returns:
        :class:`TokenLogprobs` with ``(B, T)`` tensors.
    """
    logits = response_logits(model, input_ids, attention_mask, response_length, temperature=temperature,
                             share_prompt=share_prompt)
    return logprobs_from_logits(logits, input_ids[:, -response_length:], with_entropy=with_entropy,
                                chunk_size=chunk_size, entropy_grad=entropy_grad)


def response_logits(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, response_length: int, *,
                    temperature: float = 1.0, share_prompt: bool = False) -> Tensor:
    """``(B, T, V)`` logits that predict the ``T`` response tokens (position ``t`` predicts token
    ``t``), divided by ``temperature``; with ``share_prompt`` each distinct prompt runs once."""
    logits = shared_prompt_logits(model, input_ids, attention_mask, response_length) if share_prompt else None
    if logits is None:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=response_length + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1]  # position j predicts token j + 1
    return logits / temperature if temperature != 1.0 else logits


def shared_prompt_logits(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                         response_length: int) -> Optional[Tensor]:
    """Logits that predict the response tokens, computing each distinct prompt only once.

    The ``k`` samples of a prompt share its tokens. The distinct prompts go through the model
    once (``U`` rows instead of ``B``); their key/value cache is then gathered to the ``B`` rows
    (``batch_select_indices``, differentiable) and the responses run on top of it with their
    true positions. Same numbers as the plain forward (tested), with the prompt's share of the
    forward and backward work divided by ``k``. Returns ``None`` when no prompt repeats (the
    plain forward is then as cheap).

    Returns:
        ``(B, T, V)`` logits; position ``t`` predicts response token ``t``.
    """
    from ..engines.kv_cache import new_cache, with_cache

    n, width = input_ids.shape
    p = width - response_length
    prompts = input_ids[:, :p]
    unique, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    if unique.shape[0] == n:
        return None
    first = torch.full((unique.shape[0],), n, dtype=torch.long, device=input_ids.device).scatter_reduce(
        0, inverse, torch.arange(n, device=input_ids.device), "amin")
    prompt_mask = attention_mask[first, :p]
    positions = position_ids_from_mask(prompt_mask)
    cache = new_cache()
    head = model(input_ids=prompts[first], attention_mask=prompt_mask, position_ids=positions, logits_to_keep=1,
                 **with_cache(model, cache))
    cache.batch_select_indices(inverse)
    response_positions = positions[inverse, -1:] + 1 + torch.arange(response_length, device=input_ids.device)
    tail = model(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=response_positions,
                 **with_cache(model, cache))
    return torch.cat([head.logits[inverse, -1:], tail.logits[:, :-1]], dim=1)


def naive_response_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                            response_length: int) -> Tensor:
    """Reference: full float32 log-softmax over every position, then gather (tests only)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)[:, -response_length - 1 : -1]
    return logp.gather(-1, input_ids[:, -response_length:, None]).squeeze(-1)
