"""KL coefficient controllers (docs/algorithms.md, "KL to the reference": adaptive beta, Ziegler et al. 2019)."""

from __future__ import annotations

import pytest

from reinforcepp.core import AdaptiveKLController, FixedKLController


def test_fixed_controller_is_constant():
    c = FixedKLController(0.05)
    for kl in (0.0, 3.0, 100.0, -1.0):
        assert c.update(kl, 64) == 0.05
    assert c.value == 0.05


def test_adaptive_controller_scripted_sequence():
    # target 6, horizon 10000, n = 64 responses per batch, beta_0 = 0.1; e = clip(KL/6 - 1, -0.2, 0.2)
    c = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    script = [
        # KL 12: 12/6 - 1 = 1 -> clipped to 0.2; beta = 0.1 * (1 + 0.2 * 64 / 10000) = 0.1 * 1.00128 = 0.100128
        (12.0, 0.100128),
        # KL 6: e = 0 -> unchanged
        (6.0, 0.100128),
        # KL 3: 3/6 - 1 = -0.5 -> clipped to -0.2; beta = 0.100128 * (1 - 0.00128) = 0.100128 - 0.00012816384
        #       = 0.09999983616
        (3.0, 0.09999983616),
        # KL 6.6: 6.6/6 - 1 = 0.1 (inside the clip); beta = 0.09999983616 * (1 + 0.1 * 64/10000)
        #       = 0.09999983616 * 1.00064 = 0.09999983616 + 0.0000639998951424 = 0.1000638360551424
        (6.6, 0.1000638360551424),
        # KL 0: -1 -> -0.2; beta = 0.1000638360551424 * 0.99872 = 0.1000638360551424 - 0.000128081710150582
        #       = 0.0999357543449918
        (0.0, 0.0999357543449918),
    ]
    for kl, beta in script:
        assert c.update(kl, 64) == pytest.approx(beta, rel=0, abs=1e-15)
        assert c.value == pytest.approx(beta, rel=0, abs=1e-15)


def test_adaptive_controller_moves_beta_towards_the_target():
    # KL persistently above target raises beta, below lowers it; n/horizon sets the speed.
    up = AdaptiveKLController(value=1.0, target=1.0, horizon=100)
    for _ in range(10):
        up.update(5.0, 10)
    # 10 steps of * (1 + 0.2 * 10/100) = 1.02^10 = 1.2189944
    assert up.value == pytest.approx(1.02**10, rel=1e-12)
    down = AdaptiveKLController(value=1.0, target=1.0, horizon=100)
    for _ in range(10):
        down.update(0.0, 10)
    assert down.value == pytest.approx(0.98**10, rel=1e-12)


def test_adaptive_controller_validates():
    with pytest.raises(ValueError):
        AdaptiveKLController(value=0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(value=0.1, target=1.0, horizon=0)
