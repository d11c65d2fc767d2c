"""ErrorControlledGD: the step's error estimate and controller by hand, the tolerance bounds the
local error, rejections restore θ, exact resume from state_dict, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gradkit.errors import GradkitError
from gradkit.optim import ErrorControlledGD


def quadratic(n=5, cond=50.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = (q * torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ q.T
    return (a + a.T) / 2, torch.randn(n, generator=gen, dtype=torch.float64)


def closure_for(theta, loss_fn, opt):
    def closure():
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss

    return closure


def test_first_step_matches_the_controller_by_hand():
    a, x0 = quadratic()
    theta = torch.nn.Parameter(x0.clone())
    tol, h = 1e-3, 1e-3
    opt = ErrorControlledGD([theta], lr=h, tol=tol)
    loss0 = opt.step(closure_for(theta, lambda t: 0.5 * t @ (a @ t), opt))
    g0 = a @ x0
    x1 = x0 - h * g0
    err = ((h / 2 * (a @ x1 - g0) / tol).square().mean()).sqrt()
    assert err <= 1  # this first step is accepted
    assert torch.allclose(theta.detach(), x1)
    assert float(loss0) == pytest.approx(float(0.5 * x0 @ a @ x0))
    factor = min(5.0, max(0.2, 0.9 * float(err) ** -0.5))
    assert opt.stats["h"] == pytest.approx(h * factor)
    assert opt.flow_time == pytest.approx(h)
    assert opt.stats["grad_evals"] == 2 and opt.stats["rejected"] == 0


def test_tolerance_bounds_the_local_error_and_rejections_restore():
    a, x0 = quadratic()
    for tol in (1e-2, 1e-4):
        theta = torch.nn.Parameter(x0.clone())
        opt = ErrorControlledGD([theta], lr=1.0, tol=tol)  # far too large a first step: rejected
        closure = closure_for(theta, lambda t: 0.5 * t @ (a @ t), opt)
        for _ in range(20):
            before = theta.detach().clone()
            opt.step(closure)
            h = opt.last_lr
            after = theta.detach()
            assert torch.allclose(after, before - h * (a @ before))  # an accepted step is an Euler step
            heun = before - h / 2 * (a @ before + a @ after)
            assert ((after - heun) / tol).square().mean().sqrt() <= 1 + 1e-12
        assert opt.stats["rejected"] >= 1
        assert opt.stats["grad_evals"] == 1 + opt.stats["steps"] + opt.stats["rejected"]


def test_smaller_tolerance_means_smaller_steps_and_a_path_nearer_the_flow():
    a, x0 = quadratic(cond=10.0)
    from gradkit.dynamics import path_deviation

    res = {
        tol: path_deviation(
            lambda p, lr, tol=tol: ErrorControlledGD(p, lr=lr, tol=tol),
            lambda t: 0.5 * t @ (a @ t),
            x0,
            1e-3,
            40,
        )
        for tol in (1e-2, 1e-4)
    }
    assert res[1e-4].max_deviation < res[1e-2].max_deviation
    assert res[1e-4].times[-1] < res[1e-2].times[-1]


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def run(model, opt, data, start, n):
    for i in range(start, start + n):
        x, y = data[i % len(data)]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("reuse", [True, False])
def test_state_dict_resume_is_bit_identical(reuse):
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen)) for _ in range(4)]
    a = make_model()
    opt_a = ErrorControlledGD(a.parameters(), lr=0.5, tol=1e-3, rtol=1e-3, reuse_gradient=reuse)
    run(a, opt_a, data, 0, 5)
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    run(a, opt_a, data, 5, 7)
    b = make_model()
    b.load_state_dict(saved_model)
    opt_b = ErrorControlledGD(b.parameters(), lr=1e-3)
    opt_b.load_state_dict(saved_opt)
    run(b, opt_b, data, 5, 7)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert opt_a.stats == opt_b.stats


def test_training_lowers_the_loss():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 4, generator=gen)
    y = torch.sin(x[:, :1]) + x[:, 1:2]
    model = make_model()
    opt = ErrorControlledGD(model.parameters(), lr=1e-3, tol=1e-3)
    with torch.no_grad():
        first = torch.nn.functional.mse_loss(model(x), y)
    run(model, opt, [(x, y)], 0, 150)
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(model(x), y) < 0.5 * first


def test_bad_input():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kw in (dict(lr=0.0), dict(tol=0.0), dict(rtol=-1.0), dict(safety=2.0), dict(lr_min=1.0)):
        with pytest.raises(GradkitError):
            ErrorControlledGD(p, **{"lr": 0.1, **kw})
    with pytest.raises(GradkitError):
        ErrorControlledGD([{"params": p}, {"params": [torch.nn.Parameter(torch.zeros(1))]}])
    opt = ErrorControlledGD(p, lr=0.1)
    with pytest.raises(GradkitError):
        opt.step(None)
    # a loss that is NaN past the start: every step is rejected down to lr_min, then an error, θ kept
    theta = torch.nn.Parameter(torch.ones(2))
    opt = ErrorControlledGD([theta], lr=0.1, lr_min=1e-3)

    def closure():
        opt.zero_grad()
        loss = (theta**2).sum() + (0.0 if torch.equal(theta.detach(), torch.ones(2)) else float("nan"))
        loss.backward()
        return loss

    with pytest.raises(GradkitError, match="lr_min"):
        opt.step(closure)
    assert torch.equal(theta.detach(), torch.ones(2))


def test_a_zero_gradient_does_not_grow_the_step():
    # 0.5·(x² − y²) from its saddle: the gradient is exactly 0 at every step, the step stays lr
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = ErrorControlledGD([theta], lr=1e-3, tol=1e-3)
    closure = closure_for(theta, lambda t: 0.5 * (t[0] ** 2 - t[1] ** 2), opt)
    for _ in range(1000):
        opt.step(closure)
    assert opt.stats["h"] == 1e-3 and opt.stats["rejected"] == 0
    assert torch.equal(theta.detach(), torch.zeros(2, dtype=torch.float64))


def test_after_a_flat_stretch_the_step_shrinks_back_within_max_rejects():
    # a zero-gradient plateau (longer than the 446 steps in which ×5 per step overflows), then a
    # nearly flat stretch that grows h to its cap, then a stiff quadratic that needs h ≈ 1e-3
    theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = ErrorControlledGD([theta], lr=1e-3, tol=1e-3, reuse_gradient=False)
    curvature = [0.0]
    closure = closure_for(theta, lambda t: curvature[0] * (t**2).sum(), opt)
    for _ in range(460):
        opt.step(closure)
    assert opt.stats["h"] == 1e-3
    curvature[0] = 1e-12
    for _ in range(100):
        opt.step(closure)
    assert opt.stats["h"] == opt.param_groups[0]["lr_max"] < math.inf
    curvature[0] = 25.0
    for _ in range(20):
        opt.step(closure)  # each step would raise after max_rejects rejections
    assert 0 < opt.stats["rejected"] <= opt.param_groups[0]["max_rejects"]
    assert abs(float(theta.detach())) < 0.9 and opt.stats["last_lr"] < 2 / 50
