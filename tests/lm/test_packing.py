"""Packing: the token-budget planner on hand-made lengths, the packed layout and mask by hand, and
the packed forward against the padded ``response_logprobs`` (log-probs, entropy, gradients) on
tiny Llama, Qwen2 and Qwen3 models."""

from types import SimpleNamespace

import pytest
import torch

from reinforcepp.lm.batch import collate
from reinforcepp.lm.logprobs import response_logprobs
from reinforcepp.lm.micro_batches import (
    equalize_micro_batch_counts,
    micro_batch_token_count,
    padding_fraction,
    plan_micro_batches,
    prompt_groups,
    sequence_lengths,
    split_to_count,
    update_token_counts,
)
from reinforcepp.lm.packing import (
    block_causal_mask,
    pack_layout,
    packed_attention_method,
    packed_response_logprobs,
)
from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model

# ------------------------------------------------------------------------------------------------ planner


def _loads(plan, prompt, response, groups=None):
    return [micro_batch_token_count(rows, prompt, response, groups) for rows in plan]


def test_plan_balances_within_the_budget():
    # costs 10, 9, 8, 7, 6, 5 (45 tokens), budget 16: first-fit decreasing needs 3 bins loaded
    # 16, 16, 13; the greedy balance with 3 bins pairs 10+5, 9+6, 8+7 = 15 each.
    prompt, response = [2] * 6, [8, 7, 6, 5, 4, 3]
    plan = plan_micro_batches(prompt, response, 16)
    assert plan == [[0, 5], [1, 4], [2, 3]]
    assert _loads(plan, prompt, response) == [15, 15, 15]


def test_plan_keeps_first_fit_decreasing_count_when_the_balance_overflows():
    # costs 5, 5, 4, 3, 3, budget 10: two bins hold them ({5, 5}, {4, 3, 3}); the greedy balance
    # with 2 bins makes 5+4 | 5+3+3 = 11 > 10, so first-fit decreasing's bins are kept.
    prompt, response = [1] * 5, [4, 4, 3, 2, 2]
    plan = plan_micro_batches(prompt, response, 10)
    assert plan == [[0, 1], [2, 3, 4]]
    assert _loads(plan, prompt, response) == [10, 10]


def test_plan_every_row_once_and_within_budget_on_a_long_tail():
    g = torch.Generator().manual_seed(0)
    response = torch.distributions.LogNormal(4.0, 1.0).sample((64,)).clamp(1, 512).long().tolist()
    prompt = torch.randint(5, 40, (64,), generator=g).tolist()
    plan = plan_micro_batches(prompt, response, 1024)
    assert sorted(i for rows in plan for i in rows) == list(range(64))
    loads = _loads(plan, prompt, response)
    assert max(loads) <= 1024
    assert loads == sorted(loads, reverse=True)  # heaviest first
    total = sum(p + r for p, r in zip(prompt, response))
    assert len(plan) <= -(-total // 1024) + 1


def test_plan_keeps_groups_together_and_counts_their_prompt_once():
    # three prompts (10, 4, 6 tokens), samples' responses: group a 3+3, group b 5+5+5, group c 2
    prompt = [10, 10, 4, 4, 4, 6]
    response = [3, 3, 5, 5, 5, 2]
    groups = [0, 0, 1, 1, 1, 2]
    plan = plan_micro_batches(prompt, response, 20, groups=groups)
    # group costs 16, 19, 8: each alone fits, no two fit together -> 3 micro-batches, heaviest first
    assert plan == [[2, 3, 4], [0, 1], [5]]
    assert _loads(plan, prompt, response, groups) == [19, 16, 8]
    # the same rows counted without sharing cost more
    assert micro_batch_token_count([2, 3, 4], prompt, response) == 27


def test_a_group_larger_than_the_budget_is_cut_each_part_computing_the_prompt():
    prompt, response, groups = [6] * 4, [5, 4, 3, 2], [0] * 4
    # whole group: 6 + 14 = 20 > 12; parts of at most 12 - 6 = 6 response tokens: {5}, {4, 2}, {3}
    plan = plan_micro_batches(prompt, response, 12, groups=groups)
    assert plan == [[1, 3], [0], [2]]
    assert _loads(plan, prompt, response, groups) == [12, 11, 9]


def test_a_sequence_longer_than_the_budget_is_refused_naming_both_numbers():
    with pytest.raises(
        ValueError, match=r"sequence 1 has 25 tokens \(5 prompt \+ 20 response\), more than micro_batch_tokens=24"
    ):
        plan_micro_batches([3, 5], [4, 20], 24)
    with pytest.raises(ValueError, match="micro_batch_tokens must be positive"):
        plan_micro_batches([3], [4], 0)


def test_split_to_count_halves_the_heaviest_and_equalizes_ranks():
    prompt, response = [1] * 6, [9, 7, 5, 3, 2, 1]  # costs 10, 8, 6, 4, 3, 2
    rank0 = plan_micro_batches(prompt, response, 40)  # everything in one micro-batch (33 tokens)
    assert rank0 == [[0, 1, 2, 3, 4, 5]]
    two = split_to_count(rank0, 2, prompt, response)  # greedy halves: 10+4+3 | 8+6+2
    assert two == [[0, 3, 4], [1, 2, 5]]
    assert _loads(two, prompt, response) == [17, 16]
    three = split_to_count(two, 3, prompt, response)  # the 17 is cut: 10 | 4+3
    assert three == [[1, 2, 5], [0], [3, 4]]
    # a rank with a single row must fill the count with empty micro-batches
    plans = equalize_micro_batch_counts([two, [[0]]], [prompt, [4]], [response, [4]])
    assert plans == [two, [[0], []]]
    with pytest.raises(ValueError, match="cannot merge 3 micro-batches into 2"):
        split_to_count(three, 2, prompt, response)


def test_split_to_count_cuts_groups_before_rows():
    prompt, response, groups = [4, 4, 4, 4], [6, 6, 1, 1], [0, 0, 1, 1]  # group costs 16 and 6
    [one] = plan_micro_batches(prompt, response, 30, groups=groups)
    halves = split_to_count([one], 2, prompt, response, groups=groups)
    assert halves == [[0, 1], [2, 3]]  # whole groups
    quarters = split_to_count(halves, 3, prompt, response, groups=groups)
    assert quarters == [[0], [1], [2, 3]]  # then the heavy group's rows, each with its prompt
    assert _loads(quarters, prompt, response, groups) == [10, 10, 6]


# ------------------------------------------------------------------------------------------------ layout


def test_sequence_lengths_and_groups_from_a_collated_batch():
    b = collate([[5, 6, 7], [8], [5, 6, 7]], [[9, 2], [10, 11, 12], [13]], pad_token_id=0)
    assert sequence_lengths(b.attention_mask, b.response_length) == ([3, 1, 3], [2, 3, 1])
    assert prompt_groups(b.input_ids, b.response_length) == [0, 1, 0]
    broken = b.attention_mask.clone()
    broken[1, 3] = 0  # a hole inside a response
    with pytest.raises(ValueError, match="row 1 of the attention mask"):
        sequence_lengths(broken, b.response_length)


def test_pack_layout_by_hand():
    # rows: prompt [5,6] + response [9,2]; prompt [7] + response [10]; prompt [5,6] + response [11,12,2]
    b = collate([[5, 6], [7], [5, 6]], [[9, 2], [10], [11, 12, 2]], pad_token_id=0)  # width 2 + 3
    plain = pack_layout(b.attention_mask, 3)
    assert b.input_ids.reshape(-1)[plain.source].tolist() == [5, 6, 9, 2, 7, 10, 5, 6, 11, 12, 2]
    assert plain.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4]
    assert plain.sequence.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert plain.branch.tolist() == [0] * 11
    assert plain.logit_index.tolist() == [1, 2, 4, 7, 8, 9]  # the prompt's last token, then the response's
    assert list(zip(plain.rows.tolist(), plain.cols.tolist())) == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert plain.sequence_lengths == [4, 2, 5]
    tree = pack_layout(b.attention_mask, 3, groups=[0, 1, 0])  # rows 0 and 2 share [5, 6]
    assert b.input_ids.reshape(-1)[tree.source].tolist() == [5, 6, 9, 2, 11, 12, 2, 7, 10]
    assert tree.position_ids.tolist() == [0, 1, 2, 3, 2, 3, 4, 0, 1]
    assert tree.sequence.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert tree.branch.tolist() == [0, 0, 1, 1, 2, 2, 2, 0, 1]
    assert tree.logit_index.tolist() == [1, 2, 1, 4, 5, 7]
    assert list(zip(tree.rows.tolist(), tree.cols.tolist())) == [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (1, 0)]


def test_block_causal_mask_by_hand():
    # one tree: prompt (2 tokens, branch 0), response 1 (1 token), response 2 (2 tokens); then a lone sequence
    mask = block_causal_mask(torch.tensor([0, 0, 0, 0, 0, 1]), torch.tensor([0, 0, 1, 2, 2, 0]))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_padding_fraction_by_hand():
    # prompts of 3, 1, 3 tokens, responses of 2, 3, 1: width 3 + 3 = 6, 13 real tokens
    b = collate([[5, 6, 7], [8], [5, 6, 7]], [[9, 2], [10, 11, 12], [13]], pad_token_id=0)
    one = [[0, 1, 2]]
    assert update_token_counts(b.attention_mask, 3, one, packed=False) == (18, 13)
    assert padding_fraction(b.attention_mask, 3, one, packed=False) == pytest.approx(5 / 18)
    assert padding_fraction(b.attention_mask, 3, [[0], [1, 2]], packed=False) == pytest.approx(5 / 18)
    # sharing rows 0 and 2's prompt: padded computes 2 prompts x 3 + 3 rows x 3 = 15, real 3 + 1 + 6 = 10
    groups = prompt_groups(b.input_ids, 3)
    assert update_token_counts(b.attention_mask, 3, one, packed=False, groups=groups) == (15, 10)
    assert update_token_counts(b.attention_mask, 3, one, packed=True, groups=groups) == (10, 10)
    assert padding_fraction(b.attention_mask, 3, one, packed=True) == 0.0
    # split apart, rows 0 and 2 compute the prompt each: nothing shared, full width
    assert update_token_counts(b.attention_mask, 3, [[0, 1], [2]], packed=False, groups=groups) == (18, 13)


# ------------------------------------------------------------------------------------------------ forward


def _llama(tok):
    return build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)


def _qwen(tok, name: str):
    import transformers

    config_type = getattr(transformers, f"{name}Config")
    model_type = getattr(transformers, f"{name}ForCausalLM")
    config = config_type(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    return model_type(config)


MODELS = {"llama": _llama, "qwen2": lambda tok: _qwen(tok, "Qwen2"), "qwen3": lambda tok: _qwen(tok, "Qwen3")}


def _batch(tok):
    """Three prompts (two repeated, interleaved), uneven responses incl. length 1, and
    multi-turn-style response masks (0 on observation tokens inside a response)."""
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7], [8, 9], [5, 6, 7], [10, 11, 12, 13], [8, 9]]
    responses = [[10, 11, 2], [12], [13, 14, 15, 16, 17, 2], [14, 15, 16], [10], [17, 2], [18, 19, 20, 21]]
    masks = [[1, 1, 1], [1], [1, 0, 0, 1, 1, 1], [1, 0, 1], [1], [1, 1], [1, 1, 0, 1]]
    return collate(prompts, responses, tok.pad_token_id, response_masks=masks)


def _real(b):
    """Every real response token (model's and observations'): the positions both forwards compute."""
    return b.attention_mask[:, -b.response_length :].bool()


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("share_prompt,method", [(False, "mask"), (False, "position_ids"), (True, "mask")])
def test_packed_logprobs_and_entropy_equal_the_padded_forward(arch, share_prompt, method):
    tok = build_char_tokenizer()
    model = MODELS[arch](tok)
    b = _batch(tok)
    kw = dict(with_entropy=True, chunk_size=3, temperature=0.7)
    padded = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length, **kw)
    packed = packed_response_logprobs(
        model, b.input_ids, b.attention_mask, b.response_length, share_prompt=share_prompt, method=method, **kw
    )
    real = _real(b)
    assert packed.logprobs.shape == packed.entropy.shape == (7, 6)
    torch.testing.assert_close(packed.logprobs[real], padded.logprobs[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.entropy[real], padded.entropy[real], atol=1e-5, rtol=0)
    assert not packed.logprobs[~real].any() and not packed.entropy[~real].any()  # zeros after each response


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("share_prompt", [False, True])
def test_gradients_through_the_packed_forward_equal_the_padded_ones(arch, share_prompt):
    tok = build_char_tokenizer()
    model = MODELS[arch](tok)
    b = _batch(tok)
    weights = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(1)) * b.response_mask

    def grads(forward):
        out = forward(
            model,
            b.input_ids,
            b.attention_mask,
            b.response_length,
            with_entropy=True,
            chunk_size=4,
            temperature=0.9,
            share_prompt=share_prompt,
        )
        loss = (out.logprobs * weights).sum() - 0.01 * (out.entropy * b.response_mask).sum()
        return torch.autograd.grad(loss, list(model.parameters()))

    for a, p in zip(grads(packed_response_logprobs), grads(response_logprobs)):
        torch.testing.assert_close(a, p, atol=1e-5, rtol=0)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_planned_packed_micro_batches_reassemble_the_padded_batch(share_prompt):
    # 1 padded forward over the batch = the planner's micro-batches, each packed, put back by row
    tok = build_char_tokenizer()
    model = _llama(tok)
    b = _batch(tok)
    prompt, response = sequence_lengths(b.attention_mask, b.response_length)
    groups = prompt_groups(b.input_ids, b.response_length) if share_prompt else None
    plan = plan_micro_batches(prompt, response, 12, groups=groups)
    assert len(plan) > 1 and max(_loads(plan, prompt, response, groups)) <= 12
    padded = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length).logprobs
    packed = torch.zeros_like(padded)
    for rows in plan:
        part = b.select(torch.tensor(rows))
        out = packed_response_logprobs(
            model, part.input_ids, part.attention_mask, b.response_length, share_prompt=share_prompt
        )
        packed[rows] = out.logprobs
    real = _real(b)
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=0)
    empty = b.select(torch.tensor([], dtype=torch.long))
    assert packed_response_logprobs(model, empty.input_ids, empty.attention_mask, b.response_length).logprobs.shape == (
        0,
        6,
    )


def test_eager_attention_gets_an_additive_mask():
    tok = build_char_tokenizer()
    model = _llama(tok)
    model.set_attn_implementation("eager")
    b = _batch(tok)
    padded = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length)
    real = _real(b)
    for share_prompt in (False, True):
        packed = packed_response_logprobs(
            model, b.input_ids, b.attention_mask, b.response_length, share_prompt=share_prompt
        )
        torch.testing.assert_close(packed.logprobs[real], padded.logprobs[real], atol=1e-5, rtol=0)


def test_flex_attention_block_mask_forward_without_gradient():
    # torch 2.13 runs flex attention's backward on GPUs only; its no-gradient forward (old and
    # reference log-probs) compiles on the CPU too (seconds).
    tok = build_char_tokenizer()
    model = _llama(tok)
    b = _batch(tok)
    real = _real(b)
    with torch.no_grad():
        padded = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length)
        model.set_attn_implementation("flex_attention")
        assert packed_attention_method(model, tree=True) == "flex"
        packed = packed_response_logprobs(model, b.input_ids, b.attention_mask, b.response_length, share_prompt=True)
    torch.testing.assert_close(packed.logprobs[real], padded.logprobs[real], atol=1e-5, rtol=0)


def test_without_repeated_prompts_share_prompt_packs_pairs():
    tok = build_char_tokenizer()
    model = _llama(tok)
    b = collate([[5, 6], [7]], [[8, 9], [10]], tok.pad_token_id)
    a = packed_response_logprobs(
        model, b.input_ids, b.attention_mask, 2, share_prompt=True, method="position_ids"
    )  # no tree needed
    c = packed_response_logprobs(model, b.input_ids, b.attention_mask, 2)
    assert torch.equal(a.logprobs, c.logprobs)


class _Recorder(torch.nn.Module):
    """Stands for a flash-attention model (not installable here): records the forward's arguments."""

    def __init__(self, model_type: str, impl: str, **config):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type, _attn_implementation=impl, **config)
        self.seen: dict = {}

    def forward(self, **kwargs):
        self.seen = kwargs
        return SimpleNamespace(logits=torch.zeros(1, kwargs["logits_to_keep"].numel(), 40))


def test_varlen_path_hands_the_sequence_boundaries_to_flash_attention():
    model = _Recorder("llama", "flash_attention_2")
    b = collate([[5, 6], [7], [5, 6]], [[9, 2], [10], [11, 12, 2]], pad_token_id=0)
    out = packed_response_logprobs(model, b.input_ids, b.attention_mask, 3)
    seen = model.seen
    assert seen["attention_mask"] is None
    assert seen["cu_seq_lens_q"].tolist() == seen["cu_seq_lens_k"].tolist() == [0, 4, 6, 11]
    assert seen["cu_seq_lens_q"].dtype == torch.int32
    assert seen["max_length_q"] == seen["max_length_k"] == 5
    assert seen["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4]]
    torch.testing.assert_close(
        out.logprobs[_real(b)], torch.full((6,), -torch.log(torch.tensor(40.0)))
    )  # uniform logits
    with pytest.raises(
        ValueError, match="'llama' with attn_implementation='flash_attention_2' cannot attend a shared prompt"
    ):
        packed_response_logprobs(model, b.input_ids, b.attention_mask, 3, share_prompt=True)


def test_unverified_models_are_refused_naming_the_model_type():
    with pytest.raises(ValueError, match="model type 'gpt2' is not one of the tested architectures"):
        packed_attention_method(_Recorder("gpt2", "sdpa"))
    with pytest.raises(
        ValueError, match="model type 'llama' with attn_implementation='paged|sdpa' cannot be restricted per sequence"
    ):
        packed_attention_method(_Recorder("llama", "paged|sdpa"))
    with pytest.raises(
        ValueError, match="model type 'qwen2' with attn_implementation='sdpa' has sliding-window attention layers"
    ):
        packed_attention_method(_Recorder("qwen2", "sdpa", layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(ValueError, match="model type 'llama' with attn_implementation='sdpa' takes attention method"):
        packed_attention_method(_Recorder("llama", "sdpa"), method="varlen")
    with pytest.raises(ValueError, match="cannot attend a shared prompt .* method 'position_ids'"):
        packed_attention_method(_Recorder("llama", "sdpa"), tree=True, method="position_ids")
    assert packed_attention_method(_Recorder("qwen3", "eager"), tree=True) == "mask"
