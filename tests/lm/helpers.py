"""Shared builders for the language-model tests: everything tiny and local."""

from __future__ import annotations

import datasets
import torch

from reinforcepp.lm.batch import collate
from reinforcepp.lm.config import LMConfig
from reinforcepp.lm.logprobs import response_logprobs
from reinforcepp.lm.rollout import Rollout
from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model, get_task


def tiny_policy(seed: int = 0, hidden_size: int = 32):
    tok = build_char_tokenizer()
    return tok, build_tiny_model(tok, hidden_size=hidden_size, num_layers=1, num_heads=2, seed=seed)


def reverse_dataset(n: int, seed: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_list(get_task("reverse").examples(n, seed))


def fraction_of_a(prompts, completions, **_):
    """An easy dense reward: the fraction of 'a' characters in the completion."""
    return [c.count("a") / max(1, len(c)) for c in completions]


def seeded_rollout(trainer, rows: list, k: int, seed: int) -> Rollout:
    """``k`` scored samples of each of ``rows`` as one rollout, drawn under ``torch.manual_seed(seed)``:
    the same rollout on every process and in every run (for 1 = K and 1 rank = 2 ranks tests)."""
    torch.manual_seed(seed)
    gen, prompts, completions, expanded, result = trainer.sampler.generate_and_score(
        rows, k, trainer.sampler.sampling(), trainer.step)
    return Rollout(expanded, prompts, completions, gen, result.rewards, result.per_source, {})


def logprob_gap(model, tok, gen, temperature: float = 1.0) -> float:
    """The largest difference, over real response tokens, between ``model``'s log-probs of ``gen``'s
    responses and the log-probs the engine sampled them with."""
    b = collate(gen.prompt_ids, gen.response_ids, tok.pad_token_id)
    with torch.no_grad():
        mine = response_logprobs(
            model, b.input_ids, b.attention_mask, b.response_length, temperature=temperature
        ).logprobs
    return float(((mine - gen.sampler_logprob_tensor(b.response_length)).abs() * b.response_mask).max())


def small_config(tmp_path, **overrides) -> LMConfig:
    base = dict(
        output_dir=str(tmp_path / "run"), total_steps=4, prompts_per_step=4, samples_per_prompt=4, micro_batch_size=8,
        max_new_tokens=4, lr=1e-2, eval_every=0, progress=False, tensorboard=False, torch_threads=1, seed=0,
        kl_coef=0.05,
    )
    base.update(overrides)
    return LMConfig.from_dict(base)
