import torch

from reinforcepp.core import entropy_from_logits
from reinforcepp.lm.batch import collate
from reinforcepp.lm.logprobs import logprobs_from_logits, naive_response_logprobs, response_logprobs

from tests.lm.helpers import tiny_policy


def test_chunked_logprobs_equal_naive_full_log_softmax():
    tok, model = tiny_policy()
    batch = collate([[5, 6, 7], [8, 9]], [[10, 11, 2], [12]], tok.pad_token_id)
    for chunk in (1, 2, 64):
        fast = response_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.response_length, chunk_size=chunk
        ).logprobs
        naive = naive_response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_length)
        torch.testing.assert_close(fast * batch.response_mask, naive * batch.response_mask, atol=1e-6, rtol=0)


def test_left_padding_does_not_change_logprobs():
    # Position ids skip the left padding, so a prompt's log-probs do not depend on its neighbours.
    tok, model = tiny_policy()
    alone = collate([[5, 6]], [[10, 11]], tok.pad_token_id)
    padded = collate([[5, 6], [7, 8, 9, 10, 11]], [[10, 11], [12, 13]], tok.pad_token_id)
    a = response_logprobs(model, alone.input_ids, alone.attention_mask, 2).logprobs[0]
    b = response_logprobs(model, padded.input_ids, padded.attention_mask, 2).logprobs[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_entropy_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    out = logprobs_from_logits(logits, targets, with_entropy=True, chunk_size=2)
    torch.testing.assert_close(out.entropy, entropy_from_logits(logits), atol=1e-6, rtol=0)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, expected, atol=1e-6, rtol=0)


def test_shared_prompt_forward_equals_plain_forward_with_gradients():
    # Two prompts of different lengths, three samples each (interleaved order), responses right-padded.
    tok, model = tiny_policy()
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7], [8, 9], [5, 6, 7], [8, 9]]
    responses = [[10, 11, 2], [12], [13, 2], [14, 15, 16], [10], [17, 2]]
    batch = collate(prompts, responses, tok.pad_token_id)
    plain = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_length, with_entropy=True)
    shared = response_logprobs(
        model, batch.input_ids, batch.attention_mask, batch.response_length, with_entropy=True, share_prompt=True
    )
    m = batch.response_mask
    torch.testing.assert_close(shared.logprobs * m, plain.logprobs * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.entropy * m, plain.entropy * m, atol=1e-5, rtol=0)
    g_plain = torch.autograd.grad((plain.logprobs * m).sum(), list(model.parameters()))
    g_shared = torch.autograd.grad((shared.logprobs * m).sum(), list(model.parameters()))
    for a, b in zip(g_plain, g_shared):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
