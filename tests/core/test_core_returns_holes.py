"""Returns and GAE over masks with holes (a multi-turn episode's observations): masked-out
positions are skipped, steps are counted on real tokens only, and a prefix mask gives the same
numbers as before."""

import torch

from reinforcepp.core import discounted_returns, gae
from reinforcepp.core.returns import discounted_returns_loop, gae_loop


def test_returns_skip_observation_tokens_hand_computed():
    # real tokens at 0, 1, 4 (2, 3 = an observation), padding at 5
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 0]])
    r = torch.tensor([[0.5, 0.0, 9.0, 9.0, 1.0, 9.0]])  # rewards on masked positions are ignored
    g = discounted_returns(r, mask, gamma=0.5)
    # G_4 = 1; G_1 = 0 + 0.5 * 1 = 0.5; G_0 = 0.5 + 0.5 * 0.5 = 0.75 (the hole is not a step)
    torch.testing.assert_close(g, torch.tensor([[0.75, 0.5, 0.0, 0.0, 1.0, 0.0]]), atol=0, rtol=0)


def test_gae_skips_observation_tokens_hand_computed():
    mask = torch.tensor([[1.0, 0, 1, 0]])
    r = torch.tensor([[0.0, 5.0, 1.0, 0.0]])
    v = torch.tensor([[0.2, 7.0, 0.4, 3.0]])
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0.0 - 0.4  # last real token: terminal
    d0 = 0.0 + 0.9 * 0.4 - 0.2  # next state of token 0 is token 2
    a0 = d0 + 0.9 * 0.5 * d2
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, d2, 0.0]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.2, 0.0, d2 + 0.4, 0.0]]), atol=1e-7, rtol=0)


def test_vectorised_equals_loop_with_holes():
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 12, generator=gen) > 0.35).float()
    mask[:, 0] = 1
    mask[2, 8:] = 0  # trailing padding as well as holes
    r = torch.randn(6, 12, generator=gen) * mask
    v = torch.randn(6, 12, generator=gen)
    last = torch.randn(6, generator=gen)
    for boot in (None, last):
        torch.testing.assert_close(
            discounted_returns(r, mask, 0.9, boot), discounted_returns_loop(r, mask, 0.9, boot), atol=1e-5, rtol=0
        )
        a, ret = gae(r, v, mask, 0.9, 0.8, boot)
        a_ref, ret_ref = gae_loop(r, v, mask, 0.9, 0.8, boot)
        torch.testing.assert_close(a, a_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ret, ret_ref, atol=1e-5, rtol=0)
