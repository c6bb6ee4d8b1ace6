"""The natural-gradient / TRPO step (core/natural.py) against hand-computed numbers: conjugate
gradient on known systems, Fisher-vector products against the closed-form Fisher matrices of a
categorical and a diagonal Gaussian (and against the outer-product definition for a linear
softmax policy), the KL-radius scaling, and the backtracking line search on a 1-D toy."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from reinforcepp.core import (
    backtracking_line_search,
    categorical_kl,
    conjugate_gradient,
    diagonal_gaussian_kl,
    fisher_vector_product,
    flat_grad,
    flat_params,
    scale_to_kl_radius,
    set_flat_params,
)

EXACT64 = {"atol": 1e-12, "rtol": 0}


# --- conjugate gradient -------------------------------------------------------------------------------------------


def test_cg_solves_a_2x2_system_in_two_iterations():
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # A^-1 = [[3, -1], [-1, 4]] / 11, so x = (3 - 2, -1 + 8) / 11
    solve = conjugate_gradient(lambda v: a @ v, b, iters=2)
    assert_close(solve, torch.tensor([1 / 11, 7 / 11], dtype=torch.float64), **EXACT64)
    # one iteration: x_1 = alpha b with alpha = b.b / b.Ab = 5 / (1 * 6 + 2 * 7) = 0.25
    one = conjugate_gradient(lambda v: a @ v, b, iters=1)
    assert_close(one, torch.tensor([0.25, 0.5], dtype=torch.float64), **EXACT64)


def test_cg_is_exact_after_n_iterations_on_an_n_by_n_system():
    n = 6
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([1.0, 3.0, 7.0, 15.0, 40.0, 100.0], dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    assert_close(conjugate_gradient(lambda v: a @ v, b, iters=n), exact, atol=1e-9, rtol=0)
    # not before: with 6 distinct eigenvalues, n - 2 iterations leave a visible error
    assert (conjugate_gradient(lambda v: a @ v, b, iters=n - 2) - exact).norm() > 1e-4


def test_cg_stops_at_the_residual_tolerance():
    a = torch.diag(torch.tensor([2.0, 5.0], dtype=torch.float64))
    calls = []

    def avp(v):
        calls.append(1)
        return a @ v

    b = torch.tensor([0.0, 3.0], dtype=torch.float64)  # an eigenvector: solved in one step
    assert_close(conjugate_gradient(avp, b, iters=10), torch.tensor([0.0, 0.6], dtype=torch.float64), **EXACT64)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="iters"):
        conjugate_gradient(avp, b, iters=0)


# --- Fisher-vector products ---------------------------------------------------------------------------------------


def test_fvp_of_a_categorical_is_diag_p_minus_p_p_transpose():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    theta = torch.nn.Parameter(p.log().clone())
    old = p.log().clone()
    v = torch.tensor([1.0, 0.0, 0.0, -1.0], dtype=torch.float64)
    fv = fisher_vector_product(lambda: categorical_kl(old, theta), [theta], v)
    # F v = p * v - p (p . v); p . v = 0.1 - 0.4 = -0.3
    assert_close(fv, torch.tensor([0.13, 0.06, 0.09, -0.28], dtype=torch.float64), **EXACT64)
    assert_close(fv, (torch.diag(p) - torch.outer(p, p)) @ v, **EXACT64)
    damped = fisher_vector_product(lambda: categorical_kl(old, theta), [theta], v, damping=0.1)
    assert_close(damped, fv + 0.1 * v, **EXACT64)


def test_fvp_of_a_batch_of_categoricals_is_block_diagonal_over_the_mean_kl():
    g = torch.Generator().manual_seed(1)
    logits0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    theta = torch.nn.Parameter(logits0.clone())
    v = torch.randn(15, generator=g, dtype=torch.float64)
    fv = fisher_vector_product(lambda: categorical_kl(logits0, theta).mean(), [theta], v)
    p = torch.softmax(logits0, -1)
    blocks = torch.block_diag(*[(torch.diag(pb) - torch.outer(pb, pb)) / 3 for pb in p])
    assert_close(fv, blocks @ v, atol=1e-12, rtol=0)


def test_fvp_of_a_diagonal_gaussian_in_mean_and_log_std():
    mu0 = torch.tensor([0.5, -1.0], dtype=torch.float64)
    ls0 = torch.tensor([math.log(2.0), 0.0], dtype=torch.float64)
    mu, log_std = torch.nn.Parameter(mu0.clone()), torch.nn.Parameter(ls0.clone())
    v = torch.tensor([1.0, 1.0, 1.0, -2.0], dtype=torch.float64)
    fv = fisher_vector_product(lambda: diagonal_gaussian_kl(mu0, ls0, mu, log_std), [mu, log_std], v)
    # F = diag(1 / s^2, 2) per dimension: (1/4, 1) on the means, 2 on each log_std
    assert_close(fv, torch.tensor([0.25, 1.0, 2.0, -4.0], dtype=torch.float64), **EXACT64)


def test_fvp_equals_the_outer_product_fisher_of_a_linear_softmax_policy():
    """Hessian of the mean KL (what the trick differentiates) = E_s E_a[grad log pi grad log pi^T]
    (Fisher's definition), for logits = x W."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w0 = 0.5 * torch.randn(3, 2, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    v = torch.randn(6, generator=g, dtype=torch.float64)
    fv = fisher_vector_product(lambda: categorical_kl(x @ w0, x @ w).mean(), [w], v)
    fisher = torch.zeros(6, 6, dtype=torch.float64)
    for s in range(4):
        for a in range(2):
            logp = torch.log_softmax(x[s] @ w, -1)
            score = flat_grad(logp[a], [w])
            fisher += logp[a].exp().detach() * torch.outer(score, score) / 4
    assert_close(fv, fisher @ v, atol=1e-12, rtol=0)


def test_flat_helpers_round_trip_and_fill_unused_parameters_with_zeros():
    a, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))
    assert_close(flat_grad((a**2).sum(), [a, b]), torch.tensor([2.0, 4.0, 0.0]), atol=0, rtol=0)
    set_flat_params([a, b], torch.tensor([5.0, 6.0, 7.0]))
    assert_close(flat_params([a, b]), torch.tensor([5.0, 6.0, 7.0]), atol=0, rtol=0)
    assert b.shape == (1, 1)
    with pytest.raises(ValueError, match="entries"):
        set_flat_params([a, b], torch.zeros(2))


# --- step size and line search ------------------------------------------------------------------------------------


def test_scale_to_kl_radius_puts_the_quadratic_kl_on_the_radius():
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    fs = torch.tensor([2.0, 0.0], dtype=torch.float64)  # s^T F s = 2
    step = scale_to_kl_radius(s, fs, max_kl=0.01)
    assert_close(step, torch.tensor([0.1, 0.0], dtype=torch.float64), **EXACT64)  # sqrt(2 * 0.01 / 2)
    assert math.isclose(0.5 * 0.1**2 * 2.0, 0.01)
    with pytest.raises(ValueError, match="not positive"):
        scale_to_kl_radius(s, -fs, max_kl=0.01)
    with pytest.raises(ValueError, match="max_kl"):
        scale_to_kl_radius(s, fs, max_kl=0.0)


def _toy(x0: float = 0.0):
    """1-D toy: loss (x - 1)^2 (1 at x = 0), 'KL' x^2 / 2 from x_old = 0."""
    x = torch.nn.Parameter(torch.tensor([x0], dtype=torch.float64))
    return x, (lambda: ((x - 1.0) ** 2).sum()), (lambda: (x**2 / 2).sum())


def test_line_search_rejects_steps_that_do_not_improve_and_accepts_the_first_that_does():
    x, loss, kl = _toy()
    # fractions 1, 1/2, 1/4 of the step 4: x = 4 (loss 9), x = 2 (loss 1, not < 1), x = 1 (loss 0); KL never binds
    step = torch.tensor([4.0], dtype=torch.float64)
    out = backtracking_line_search([x], step, loss, kl, max_kl=100.0, shrink=0.5, max_tries=10)
    assert out.accepted and out.fraction == 0.25 and out.tries == 3
    assert out.loss == 0.0 and out.improvement == 1.0 and out.kl == 0.5
    assert float(x.detach()) == 1.0


def test_line_search_rejects_an_improving_step_outside_the_kl_radius():
    x, loss, kl = _toy()
    # x = 1 (KL 0.5) and x = 0.5 (loss 0.25, KL 0.125) improve but exceed 0.1;
    # x = 0.25 (loss 0.5625, KL 0.03125) is taken
    step = torch.tensor([4.0], dtype=torch.float64)
    out = backtracking_line_search([x], step, loss, kl, max_kl=0.1, shrink=0.5, max_tries=10, loss_before=1.0)
    assert out.accepted and out.fraction == 0.0625 and out.tries == 5
    assert out.kl == 0.03125 and out.improvement == 1.0 - 0.5625
    assert float(x.detach()) == 0.25


def test_line_search_restores_the_parameters_when_nothing_is_accepted():
    x, loss, kl = _toy()
    uphill = torch.tensor([-1.0], dtype=torch.float64)
    out = backtracking_line_search([x], uphill, loss, kl, max_kl=100.0, shrink=0.5, max_tries=4)
    assert not out.accepted and out.fraction == 0.0 and out.tries == 4 and out.improvement == 0.0 and out.loss == 1.0
    assert float(x.detach()) == 0.0
    with pytest.raises(ValueError, match="shrink"):
        backtracking_line_search([x], torch.tensor([1.0]), loss, kl, max_kl=1.0, shrink=1.0)


def test_natural_step_on_a_bandit_reaches_the_kl_radius_and_the_line_search_enforces_it():
    """The whole step on a 3-armed bandit: g, CG, scaling, line search. The quadratic model puts
    the full step's measured KL within 2% of max_kl; here it lies 1.5% outside (third-order
    terms), so the line search refuses it and takes half the step (KL about a quarter)."""
    old = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    theta = torch.nn.Parameter(old.clone())
    advantages = torch.tensor([1.0, -0.5, -0.2], dtype=torch.float64)

    def surrogate():  # -E_{a ~ pi_old}[ratio(a) A(a)] = -sum_a pi_theta(a) A(a)
        return -(torch.softmax(theta, -1) * advantages).sum()

    def kl():
        return categorical_kl(old, theta)

    loss0 = surrogate()
    g = flat_grad(loss0, [theta])
    s = conjugate_gradient(lambda v: fisher_vector_product(kl, [theta], v, damping=1e-3), g, iters=10)
    step = -scale_to_kl_radius(s, fisher_vector_product(kl, [theta], s, damping=1e-3), max_kl=0.005)
    set_flat_params([theta], old + step)
    full_kl = float(kl().detach())
    set_flat_params([theta], old)
    assert 1.0 < full_kl / 0.005 < 1.02
    out = backtracking_line_search([theta], step, surrogate, kl, max_kl=0.005, loss_before=float(loss0.detach()))
    assert out.accepted and out.fraction == 0.5 and out.tries == 2 and out.improvement > 0
    assert 0.24 < out.kl / 0.005 < 0.26
    assert_close(flat_params([theta]), old + 0.5 * step, atol=1e-15, rtol=0)
