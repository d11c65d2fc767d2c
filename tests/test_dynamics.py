"""gradkit.dynamics against closed forms: the flow of a quadratic is exp(−tA)θ0, Euler's deviation
from it is ((I − ηA)^k − exp(−kηA))θ0, heavy ball against the damped flow, Lanczos's λ_max against known spectra."""

from __future__ import annotations

import math

import pytest
import torch

import gradkit
from gradkit.dynamics import (
    flow_path,
    hessian_max_eigenvalue,
    loglog_slope,
    module_loss,
    momentum_flow_path,
    path_deviation,
)
from gradkit.errors import GradkitError


def quadratic(n=6, cond=100.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    a = (q * eig) @ q.T
    a = (a + a.T) / 2
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64)
    return a, eig, q, theta0, (lambda th: 0.5 * th @ (a @ th))


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)


def test_flow_of_a_quadratic_is_the_matrix_exponential():
    a, _, _, theta0, loss = quadratic()
    times = torch.tensor([0.0, 0.01, 0.1, 1.0, 5.0, 50.0], dtype=torch.float64)
    got = flow_path(loss, theta0, times)
    want = torch.stack([torch.linalg.matrix_exp(-t * a) @ theta0 for t in times])
    assert got.shape == (len(times), len(theta0))
    rel = (got - want).norm(dim=1) / theta0.norm()
    assert rel.max() < 1e-8


def test_euler_deviation_matches_its_closed_form():
    a, eig, q, theta0, loss = quadratic()
    lr, steps = 0.005, 60
    res = path_deviation(sgd, loss, theta0, lr, steps)
    c = q.T @ theta0
    k = torch.arange(steps + 1, dtype=torch.float64)[:, None]
    want = (((1 - lr * eig) ** k - torch.exp(-k * lr * eig)) * c).norm(dim=1)
    assert not res.diverged
    assert torch.allclose(res.deviation, want, rtol=1e-6, atol=1e-10)
    assert torch.allclose(res.times, k[:, 0] * lr)


def test_sgd_deviation_is_first_order_in_lr():
    _, _, _, theta0, loss = quadratic(cond=10.0)
    horizon = 1.0
    lrs = [0.02, 0.01, 0.005, 0.0025]
    devs = [path_deviation(sgd, loss, theta0, lr, round(horizon / lr)).max_deviation for lr in lrs]
    assert abs(loglog_slope(lrs, devs) - 1.0) < 0.1


def test_heavy_ball_follows_the_damped_second_order_flow():
    _, _, _, theta0, loss = quadratic(cond=10.0)
    mu = 0.9

    def heavy_ball(params, lr):
        return torch.optim.SGD(params, lr=lr, momentum=mu)

    horizon = 2.0  # in the ODE's time t = k·sqrt(lr)
    lrs = [4e-3, 1e-3, 2.5e-4]
    devs = [
        path_deviation(
            heavy_ball, loss, theta0, lr, round(horizon / math.sqrt(lr)), reference="momentum"
        ).max_deviation
        for lr in lrs
    ]
    # error O(sqrt(lr)) in the ODE's step h = sqrt(lr): deviation shrinks with lr, slope near 1/2
    assert devs[0] > devs[1] > devs[2]
    assert 0.3 < loglog_slope(lrs, devs) < 0.8
    # against the plain flow at t = k·lr the same iterates are far off
    far = path_deviation(
        heavy_ball, loss, theta0, lrs[-1], round(horizon / math.sqrt(lrs[-1])), reference="flow"
    )
    assert far.max_deviation > 10 * devs[-1]


def test_damped_flow_with_large_damping_is_the_rescaled_gradient_flow():
    a, _, _, theta0, loss = quadratic(n=4, cond=4.0)
    gamma = 200.0
    times = torch.tensor([0.0, 20.0, 100.0], dtype=torch.float64)
    second = momentum_flow_path(loss, theta0, times, gamma)
    first = flow_path(loss, theta0, times / gamma)  # overdamped: θ' ≈ −∇L/γ
    assert (second - first).norm(dim=1).max() < 0.02 * theta0.norm()


def test_divergence_past_two_over_lambda_max_is_reported():
    _, eig, _, theta0, loss = quadratic(cond=10.0)
    lam = hessian_max_eigenvalue(loss, theta0)
    assert lam == pytest.approx(float(eig.max()), rel=1e-6)
    stable = path_deviation(sgd, loss, theta0, 1.9 / lam, 200)
    unstable = path_deviation(sgd, loss, theta0, 2.1 / lam, 200)
    assert stable.losses[-1] < stable.losses[0]
    assert unstable.losses[-1] > 100 * unstable.losses[0]


def test_hessian_max_eigenvalue_on_a_module_and_the_rng():
    torch.manual_seed(123)
    model = torch.nn.Linear(5, 1, bias=False).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randn(40, 1, dtype=torch.float64)
    loss_fn, theta0 = module_loss(model, lambda out: ((out - y) ** 2).mean(), x)
    state = torch.get_rng_state()
    lam = hessian_max_eigenvalue(loss_fn, theta0)
    assert torch.equal(state, torch.get_rng_state())
    want = torch.linalg.eigvalsh(2 * x.T @ x / 40).max()
    assert lam == pytest.approx(float(want), rel=1e-6)
    assert torch.equal(theta0, model.weight.detach().reshape(-1))


def test_error_controlled_gd_is_compared_at_its_own_time():
    _, _, _, theta0, loss = quadratic(cond=10.0)
    res = path_deviation(
        lambda p, lr: gradkit.optim.ErrorControlledGD(p, lr=lr, tol=1e-4), loss, theta0, 1e-3, 30
    )
    assert res.times[-1] > 30 * 1e-3  # it grew its step
    assert torch.all(res.times[1:] > res.times[:-1])


def test_bad_input():
    _, _, _, theta0, loss = quadratic()
    with pytest.raises(GradkitError):
        flow_path(loss, theta0[None], [0.0, 1.0])
    with pytest.raises(GradkitError):
        flow_path(loss, theta0, [1.0, 0.5])
    with pytest.raises(GradkitError):
        path_deviation(sgd, loss, theta0, 0.1, 0)
    with pytest.raises(GradkitError):
        path_deviation(sgd, loss, theta0, 0.1, 3, reference="bogus")


def test_reachable_from_the_package():
    assert gradkit.dynamics.flow_path is flow_path


def test_float32_model_reference_flow_is_evaluated_in_float64():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)  # float32 parameters
    x, y = torch.randn(40, 5), torch.randn(40, 1)
    loss_fn, theta0 = module_loss(model, lambda out: ((out - y) ** 2).mean(), x)
    calls = []

    def counted(theta):
        calls.append(theta.dtype)
        if len(calls) > 5000:  # float64 needs a few hundred; float32 gradients never meet rtol 1e-10
            raise RuntimeError("the reference solver does not converge")
        return loss_fn(theta)

    res = path_deviation(sgd, counted, theta0, 0.01, 100)
    assert res.iterates.shape == (101, 6) and not res.diverged
    assert torch.float64 in calls and len(calls) < 2000
    model64 = torch.nn.Linear(5, 1).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    loss64, theta64 = module_loss(model64, lambda out: ((out - y.double()) ** 2).mean(), x.double())
    assert torch.allclose(res.reference, flow_path(loss64, theta64, res.times), rtol=1e-9, atol=1e-10)
    assert momentum_flow_path(counted, theta0, [0.0, 1.0], 2.0).dtype == torch.float64
    assert res.deviation[-1] < 1e-2  # the float32 SGD iterates follow the flow at this lr


def test_a_loss_that_computes_in_float32_is_refused_by_the_reference_flow():
    a = torch.eye(3)  # float32 constant: the loss comes back float32 for a float64 theta
    with pytest.raises(GradkitError, match="float64"):
        flow_path(lambda th: 0.5 * (th.float() @ (a @ th.float())), torch.ones(3), [0.0, 1.0])


def rotated(eigs, seed=0):
    """½θᵀAθ with A = Q diag(eigs) Qᵀ: a Hessian of known spectrum."""
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    a = (q * eigs) @ q.T
    a = (a + a.T) / 2
    return lambda th: 0.5 * th @ (a @ th), torch.randn(len(eigs), generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    "eigs",
    [
        [3.0, -3.0, 1.0, 0.5],  # ±λ tie at the top of |λ|
        [1.0, -5.0, 0.5, -0.1],  # indefinite: the largest |λ| is negative
        [-1.0, -2.0, -4.0],  # negative definite: λ_max is the one nearest 0
        [0.0, -3.0, -1.0],  # λ_max = 0
    ],
)
def test_hessian_max_eigenvalue_is_the_most_positive_one(eigs):
    d = torch.tensor(eigs, dtype=torch.float64)
    diagonal = hessian_max_eigenvalue(
        lambda th: 0.5 * (d * th * th).sum(), torch.ones(len(eigs), dtype=torch.float64)
    )
    assert diagonal == pytest.approx(max(eigs), abs=1e-9)
    assert hessian_max_eigenvalue(*rotated(eigs)) == pytest.approx(max(eigs), abs=1e-9)


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-7])
def test_hessian_max_eigenvalue_tolerance_is_a_distance_to_an_eigenvalue(tol):
    gen = torch.Generator().manual_seed(3)
    eigs = torch.cat(
        [
            torch.rand(300, generator=gen, dtype=torch.float64) * 3 - 2,
            torch.tensor([1.05], dtype=torch.float64),
        ]
    )
    loss, theta = rotated(eigs, seed=3)
    got = hessian_max_eigenvalue(loss, theta, tol=tol, iters=300)
    rho = float(eigs.abs().max())
    assert got <= float(eigs.max()) + 1e-12  # a Ritz value: never above λ_max
    assert float((eigs - got).abs().min()) <= tol * rho  # the documented bound
    if tol <= 1e-4:
        assert got == pytest.approx(1.05, abs=tol * rho)  # λ_max is isolated: that eigenvalue is it
