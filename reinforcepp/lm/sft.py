"""Supervised fine-tuning (SFT): the warm start before RL, on the data formats of TRL's SFT.

* ``prompt`` / ``completion`` pairs of strings (the prompt rendered as in RL, chat template
  included; EOS appended to the completion);
* the same columns holding chat messages (TRL's conversational prompt-completion format): the
  prompt's messages, then the completion's, rendered with the tokenizer's chat template;
* a ``messages`` column of whole conversations (TRL's conversational format): every assistant
  turn is learned, the other turns are context.

The loss is the token-mean negative log-likelihood of the completion's (or the assistant
turns') tokens, with everything else masked out: ``L = -sum_{i,t} m[i,t] log p(y_{i,t}) / sum m``,
the same ``token-mean`` aggregation the RL loss uses. Chat turns are rendered turn by turn
(:func:`encode_chat`), so the prompt a model learns from is exactly the prompt RL gives it.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from ..config import Config, ConfigError, option
from ..errors import InputError, one_line
from ..core import aggregate
from .batch import collate
from .logprobs import response_logprobs

# (fewer parameters than this, lr): the default learning rate by model size, smallest first
SFT_LR_BY_SIZE: tuple[tuple[float, float], ...] = ((10e6, 1e-3), (200e6, 1e-4), (float("inf"), 2e-5))


def default_sft_lr(n_params: int) -> float:
    """The warm start's default learning rate for a model of ``n_params`` parameters:
    1e-3 below 10M (the tiny models of the examples: 1e-5 barely moves them), 1e-4 below 200M
    (GPT-2 small), 2e-5 above (TRL's ``SFTConfig`` default, for 0.5B models and up)."""
    return next(lr for limit, lr in SFT_LR_BY_SIZE if n_params < limit)


@dataclasses.dataclass
class SFTConfig(Config):
    """``reinforcepp sft``: supervised warm start on prompt/completion pairs."""

    model: Optional[str] = option(None, "model to fine-tune: a Hugging Face hub name or local path (required)")
    data: Optional[str] = option(
        None, "pairs: .jsonl, .parquet, a save_to_disk directory or a hub dataset name, with prompt and completion "
        "columns (required)")
    output_dir: Optional[str] = option(
        None, "where the fine-tuned model and its tokenizer are saved, a Hugging Face model directory (required)")
    tokenizer: Optional[str] = option(None, "tokenizer name or path (default: the model's)")
    overwrite: bool = option(
        False, "output_dir is not empty (or is the model itself): move it aside (to OUTPUT_DIR.old-<time>) instead of "
        "refusing")
    prompt_column: str = option("prompt", "column holding the prompt: a string or a list of chat messages")
    completion_column: str = option(
        "completion", "column holding the completion the model learns: a string (EOS is appended) or chat messages "
        "(rendered with the chat template)")
    messages_column: str = option(
        "messages", "used when the data has no prompt column: whole conversations (TRL's conversational format); "
        "every assistant turn is learned, the other turns are context")
    use_chat_template: bool = option(True, "apply the tokenizer's chat template to prompts when it has one")
    steps: int = option(200, "optimizer steps, each on batch_size pairs drawn at random")
    batch_size: int = option(16, "pairs per optimizer step")
    lr: Optional[float] = option(
        None, "AdamW learning rate; None = by model size: 1e-3 below 10M parameters, 1e-4 below 200M, 2e-5 above")
    weight_decay: float = option(0.0, "AdamW weight decay")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "parameter dtype; auto = float32 on CPU, bfloat16 on a GPU that supports it")
    device: str = option("auto", "torch device; auto = cuda if available, else cpu")
    torch_threads: int = option(0, "CPU threads for torch; 0 = one per physical core (as in train)")
    trust_remote_code: bool = option(False, "allow model repositories to run their own code")
    seed: int = option(0, "seed of the batch order")

    def validate(self) -> None:
        super().validate()
        missing = [k for k in ("model", "data", "output_dir") if getattr(self, k) is None]
        if missing:
            raise ConfigError(f"sft needs {', '.join(k + '=...' for k in missing)} (usage: "
                              "reinforcepp sft model=PATH data=pairs.jsonl output_dir=OUT)")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


def encode_chat(tokenizer, messages: list[dict], learn_from: int = 0) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, response_ids, response_mask)`` of a conversation, rendered with the
    tokenizer's chat template turn by turn.

    The prompt is the conversation up to its first assistant turn at index ``learn_from`` or
    later, with the template's generation prompt (as RL renders a prompt). Each later turn adds
    the text the template appends for it, tokenised on its own (as a sampled response is): the
    assistant turns are learned (mask 1) through the template's end of turn when that is the EOS
    token (EOS is appended to the last one when the template ends it with something else); the
    other turns, and the headers the template writes before an assistant turn, are context
    (mask 0). Trailing context is dropped.

    Raises:
        ValueError: no assistant turn to learn, or a template that does not render the
            conversation turn by turn (an earlier turn's text changes when a turn is added).
    """
    def render(turns: list[dict], generation_prompt: bool) -> str:
        clean = [{k: v for k, v in m.items() if v is not None} for m in turns]
        text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=generation_prompt)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    first = next((i for i, m in enumerate(messages) if i >= learn_from and m.get("role") == "assistant"), None)
    if first is None:
        raise ValueError("has no assistant turn to learn" + (" in its completion" if learn_from else ""))
    prompt = render(messages[:first], True)
    eos = tokenizer.eos_token_id
    done, response, mask = prompt, [], []
    for i in range(first, len(messages)):
        if messages[i].get("role") != "assistant":
            continue
        header, whole = render(messages[:i], True), render(messages[: i + 1], False)
        if not header.startswith(done) or not whole.startswith(header):
            raise ValueError("the chat template does not render this conversation turn by turn "
                             f"(turn {i} changes the text before it), so its assistant turns "
                             "cannot be told apart; give prompt/completion columns instead")
        context, turn = ids(header[len(done):]), ids(whole[len(header):])
        end = turn.index(eos) + 1 if eos in turn else len(turn)
        learned, after = turn[:end], turn[end:]
        if eos not in turn and i == len(messages) - 1:
            learned, after = learned + [eos], []
        response += context + learned + after
        mask += [0] * len(context) + [1] * len(learned) + [0] * len(after)
        done = whole
    while mask and mask[-1] == 0:
        mask.pop()
        response.pop()
    return ids(prompt), response, mask


def _messages_problem(value: Any) -> Optional[str]:
    if not isinstance(value, list) or not value:
        return f"is a {type(value).__name__} ({value!r:.60}), not a non-empty list of chat messages"
    for j, message in enumerate(value):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            return f"message {j} is not a dict with a string 'role' and 'content': {message!r:.60}"
    return None


def data_format(columns: Sequence[str], cfg: SFTConfig) -> str:
    """``"pairs"`` (prompt and completion columns) or ``"conversations"`` (a messages column);
    a dataset with neither is refused naming its columns."""
    if cfg.prompt_column in columns:
        if cfg.completion_column not in columns:
            whole = (f"; for whole conversations in {cfg.prompt_column!r} set messages_column={cfg.prompt_column} "
                     "instead of prompt_column" if cfg.prompt_column != "prompt"
                     else f", or give whole conversations in a {cfg.messages_column!r} column")
            raise InputError(f"{cfg.data} has a {cfg.prompt_column!r} column but no {cfg.completion_column!r} "
                             f"column (columns: {', '.join(columns)}): set completion_column=...{whole}")
        return "pairs"
    if cfg.messages_column in columns:
        return "conversations"
    raise InputError(f"{cfg.data} has neither {cfg.prompt_column!r} and {cfg.completion_column!r} "
                     f"columns nor a {cfg.messages_column!r} column of conversations (columns: "
                     f"{', '.join(columns)}): set prompt_column=/completion_column= or messages_column=")


def encode_examples(tokenizer: Any, rows: Sequence[dict], kind: str,
                    cfg: SFTConfig) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Every row as ``(prompt_ids, response_ids, response_mask)`` (:func:`encode_chat` for chat
    messages; a string completion is learned whole, EOS appended). A row that cannot be encoded
    is refused naming its number and column."""
    from .data import has_chat_template, render_prompt

    chat = cfg.use_chat_template and has_chat_template(tokenizer)
    eos = tokenizer.eos_token_id
    out: tuple[list[list[int]], list[list[int]], list[list[int]]] = ([], [], [])
    for i, row in enumerate(rows):
        column = cfg.messages_column if kind == "conversations" else cfg.completion_column
        try:
            if kind == "conversations":
                problem = _messages_problem(row[column])
                if problem:
                    raise ValueError(problem)
                if not chat:
                    raise ValueError("holds chat messages, which need the tokenizer's chat "
                                     "template (it has none, or use_chat_template=false)")
                ids = encode_chat(tokenizer, row[column])
            elif isinstance(row[column], str):
                column = cfg.prompt_column
                rendered = render_prompt(tokenizer, row[column], cfg.use_chat_template)
                prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
                answer = tokenizer(row[cfg.completion_column], add_special_tokens=False)["input_ids"] + [eos]
                ids = (list(prompt), list(answer), [1] * len(answer))
            else:
                problem = _messages_problem(row[column])
                if problem:
                    raise ValueError(problem + "; expected a string or chat messages")
                if not chat:
                    raise ValueError("holds chat messages, which need the tokenizer's chat "
                                     "template (it has none, or use_chat_template=false)")
                prompt_value = row[cfg.prompt_column]
                turns = prompt_value if isinstance(prompt_value, list) else [{"role": "user", "content": prompt_value}]
                ids = encode_chat(tokenizer, [*turns, *row[column]], learn_from=len(turns))
        except (ValueError, TypeError) as e:
            raise InputError(f"{cfg.data}: row {i}: column {column!r} {one_line(e)}") from e
        for part, values in zip(out, ids):
            part.append(values)
    return out


def encode_pairs(tokenizer, prompts: Sequence[str],
                 completions: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt, and of each completion followed by EOS."""
    p = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in prompts]
    c = [tokenizer(y, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for y in completions]
    return p, c


def sft_train(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> list[float]:
    """Train ``model`` for ``steps`` AdamW steps on random mini-batches of the pairs (linear
    warmup over the first 5% of steps, then constant). Returns the loss per step."""
    if not prompts or len(prompts) != len(completions):
        raise ValueError(f"sft needs equally many prompts and completions, got {len(prompts)} and {len(completions)}")
    p_ids, c_ids = encode_pairs(tokenizer, prompts, completions)
    return sft_on_ids(model, tokenizer.pad_token_id, p_ids, c_ids, steps=steps, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, seed=seed, on_step=on_step)


def sft_on_ids(
    model: torch.nn.Module,
    pad_token_id: int,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    *,
    response_masks: Optional[Sequence[list[int]]] = None,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> list[float]:
    """The loop of :func:`sft_train` on token ids: ``steps`` AdamW steps on random mini-batches
    (linear warmup over the first 5% of steps, then constant), loss
    ``-sum m log p(y) / sum m`` with ``m`` the response mask (``response_masks`` when given:
    0 on tokens that are not the model's, such as a multi-turn episode's observations)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses = []
    for step in range(steps):
        idx = [rng.randrange(len(prompt_ids)) for _ in range(batch_size)]
        masks = [response_masks[i] for i in idx] if response_masks is not None else None
        batch = collate([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], pad_token_id,
                        response_masks=masks)
        logp = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_length).logprobs
        loss = aggregate(-logp, batch.response_mask, "token-mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
