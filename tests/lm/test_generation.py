import math

import torch

from reinforcepp.engines import (
    HFGenerationEngine,
    SamplingParams,
    SharedPromptSampler,
    filter_logits,
    split_responses,
)
from tests.lm.helpers import tiny_policy


def _prompts(tok):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in ("rev abc=", "rev hgfed=", "sort 31=")]


def test_shared_prompt_sampler_greedy_equals_transformers_generate():
    tok, model = tiny_policy(seed=2)
    ours = SharedPromptSampler(model, tok).generate(_prompts(tok), 1, SamplingParams(6, greedy=True))
    theirs = HFGenerationEngine(model, tok).generate(_prompts(tok), 1, SamplingParams(6, greedy=True))
    assert ours.response_ids == theirs.response_ids and ours.prompt_ids == theirs.prompt_ids
    assert ours.truncated.tolist() == theirs.truncated.tolist()


def test_samples_are_laid_out_prompt_by_prompt():
    tok, model = tiny_policy()
    torch.manual_seed(0)
    gen = SharedPromptSampler(model, tok).generate(_prompts(tok), 4, SamplingParams(5))
    assert len(gen.response_ids) == 12
    assert gen.prompt_ids[0:4] == [_prompts(tok)[0]] * 4 and gen.prompt_ids[8:12] == [_prompts(tok)[2]] * 4
    assert all(1 <= len(r) <= 5 for r in gen.response_ids)


def test_filter_logits_by_hand():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # top-k 2 keeps 0.5 and 0.3
    top2 = filter_logits(z, 1.0, 2, 1.0)
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    # top-p 0.7: 0.5 < 0.7, 0.5 + 0.3 = 0.8 >= 0.7 -> keep {0.5, 0.3}; top-p 0.85 keeps three
    assert torch.isfinite(filter_logits(z, 1.0, 0, 0.7)[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(z, 1.0, 0, 0.85)[0]).tolist() == [True, True, True, False]
    # temperature 2: softmax(log p / 2) = sqrt(p) / sum sqrt(p)
    p = torch.softmax(filter_logits(z, 2.0, 0, 1.0), -1)[0]
    expected = torch.sqrt(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    torch.testing.assert_close(p, expected / expected.sum(), atol=1e-6, rtol=0)


def test_split_responses_cuts_after_eos_and_flags_truncation():
    eos, pad = 2, 0
    seqs = torch.tensor([[5, 6, eos, pad], [5, 6, 7, 8], [eos, pad, pad, pad]])
    rows, truncated = split_responses(seqs, eos, max_new_tokens=4)
    assert rows == [[5, 6, eos], [5, 6, 7, 8], [eos]]
    assert truncated.tolist() == [False, True, False]
    assert math.isclose(float(truncated.float().mean()), 1 / 3, rel_tol=1e-6)


def test_sampler_and_shared_forward_use_the_current_cache_argument():
    # transformers 5.x deprecates `past_key_values=` ("removed in 5.40"); the sampler and the
    # shared-prompt forward pass the cache under the name the model's forward declares, so no
    # deprecation warning is raised, and the greedy output still equals `generate`'s.
    import inspect
    import warnings

    from reinforcepp.engines.kv_cache import cache_argument
    from reinforcepp.lm.logprobs import response_logprobs

    tok, model = tiny_policy(seed=2)
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert cache_argument(model) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        gen = SharedPromptSampler(model, tok).generate(_prompts(tok), 2, SamplingParams(4, greedy=True))
        from reinforcepp.lm.batch import collate

        b = collate(gen.prompt_ids, gen.response_ids, tok.pad_token_id)
        shared = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length, share_prompt=True).logprobs
    plain = response_logprobs(model, b.input_ids, b.attention_mask, b.response_length, share_prompt=False).logprobs
    torch.testing.assert_close(shared * b.response_mask, plain * b.response_mask, atol=1e-5, rtol=0)


def test_cache_argument_follows_the_forward_signature():
    from reinforcepp.engines.kv_cache import cache_argument

    class Old(torch.nn.Module):  # transformers 4.x signature
        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
            return input_ids

    class New(torch.nn.Module):  # transformers 5.x signature
        def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None):
            return input_ids

    assert cache_argument(Old()) == "past_key_values" and cache_argument(New()) == "cache"


def test_reserved_cache_layers_hold_what_the_growing_ones_hold():
    # Prefill 3 rows of 5 positions into room for 8, gather them to 6 rows (the sampler's
    # batch_select_indices), then one position at a time past the reservation (the buffer
    # doubles): at every step the same keys and values as transformers' own DynamicCache,
    # and the returned tensors are views of one buffer, not copies.
    from reinforcepp.engines.kv_cache import new_cache

    torch.manual_seed(0)
    grow, reserved = new_cache(), new_cache(reserve=8)
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    for cache in (grow, reserved):
        cache.update(k, v, 0)
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    for cache in (grow, reserved):
        cache.batch_select_indices(rows)
    pointers = set()
    for step in range(6):
        k, v = torch.randn(6, 2, 1, 4), torch.randn(6, 2, 1, 4)
        kg, vg = grow.update(k, v, 0)
        kr, vr = reserved.update(k, v, 0)
        assert torch.equal(kg, kr) and torch.equal(vg, vr)
        assert reserved.get_seq_length() == grow.get_seq_length() == 6 + step
        pointers.add(kr.data_ptr())
    assert len(pointers) == 2  # the buffer made for 6 rows, then the doubled one at position 9
    assert reserved.layers[0].capacity == 18


def test_the_sampler_reserves_room_for_prompt_and_response(monkeypatch):
    import reinforcepp.engines.kv_cache as kv

    reserved: list[int] = []
    original = kv.new_cache
    monkeypatch.setattr(kv, "new_cache", lambda reserve=0: reserved.append(reserve) or original(reserve))
    tok, model = tiny_policy()
    prompts = _prompts(tok)
    SharedPromptSampler(model, tok).generate(prompts, 2, SamplingParams(7, greedy=True))
    assert reserved == [max(len(p) for p in prompts) + 7]
