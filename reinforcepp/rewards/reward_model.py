"""A Hugging Face sequence-classification reward model as a reward function."""

from __future__ import annotations

from typing import Any

import torch

from .base import RewardError


class RewardModel:
    """A Hugging Face sequence-classification reward model as a reward function.

    Scores the plain concatenation ``prompt + completion`` (no chat template: pass prompts
    already rendered the way the reward model was trained), tokenised with the model's
    tokenizer (special tokens added, right padding, truncated from the *left* to ``max_length``
    tokens so the end of the completion is kept), and returns logit 0 of the ``num_labels=1``
    head at the last non-pad token. A tokenizer without a pad token gets ``eos`` as pad.

    Args:
        name_or_path: local directory or hub name of an ``AutoModelForSequenceClassification``.
        device: where the model runs.
        dtype: model weights dtype.
        batch_size: texts per forward pass.
        max_length: maximum tokens per text.
        trust_remote_code: passed to ``from_pretrained``.
    """

    text_only = True

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        max_length: int = 1024,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.name_or_path = str(name_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.display_name = f"RewardModel({self.name_or_path!r})"
        self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.name_or_path, trust_remote_code=trust_remote_code, dtype=dtype
        )
        if self.model.config.num_labels != 1:
            raise RewardError(
                f"reward model {self.name_or_path} has num_labels={self.model.config.num_labels}; "
                "a reward model has a single output (num_labels=1)"
            )
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise RewardError(f"reward model tokenizer {self.name_or_path} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores
