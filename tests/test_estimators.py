"""Gradient estimators: Gaussian smoothing against a known gradient, antithetic vs one-sided variance,
REINFORCE's closed form, and the zeroth-order / policy-gradient equivalence on a softmax classifier."""

from __future__ import annotations

import math

import pytest
import torch

from gradkit import GradkitError, policy_gradient_loss, zo_gradient


def quadratic(dim: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    a = m @ m.T / dim + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    theta = torch.randn(dim, generator=g, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x @ a @ x + b @ x

    return f, theta, a @ theta + b


def many_estimates(f, theta, count: int, **kwargs) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.stack([zo_gradient(f, theta, n=1, generator=gen, **kwargs) for _ in range(count)])


@pytest.mark.parametrize("antithetic", [True, False], ids=["antithetic", "one-sided"])
def test_mean_of_estimates_is_within_three_standard_errors_of_the_true_gradient(antithetic):
    f, theta, grad = quadratic()
    samples = many_estimates(f, theta, 3000, sigma=0.1, antithetic=antithetic)
    mean = samples.mean(0)
    stderr = samples.std(0) / math.sqrt(len(samples))
    assert torch.all((mean - grad).abs() <= 3 * stderr), (mean - grad) / stderr


def test_antithetic_variance_is_lower_than_one_sided_and_baseline_helps():
    f, theta, _ = quadratic()
    variance = {
        name: many_estimates(f, theta, 1000, sigma=0.1, **kwargs).var(0).sum().item()
        for name, kwargs in {
            "antithetic": dict(antithetic=True),
            "baseline": dict(antithetic=False, baseline=True),
            "none": dict(antithetic=False, baseline=False),
        }.items()
    }
    assert variance["antithetic"] < variance["baseline"] < variance["none"], variance


def test_antithetic_on_a_quadratic_is_exactly_the_directional_derivative_times_u():
    f, theta, grad = quadratic()
    est = zo_gradient(f, theta, sigma=0.5, n=1, generator=torch.Generator().manual_seed(7))
    u = torch.randn(theta.shape, generator=torch.Generator().manual_seed(7), dtype=theta.dtype)
    torch.testing.assert_close(est, (grad @ u) * u)


def test_small_sigma_on_a_large_fp64_loss_keeps_the_difference():
    """f = 1000 + c·θ in fp64 with sigma 1e-6: f(θ+σu) - f(θ-σu) is far below fp32's resolution of
    1000 (6e-5) but exact in fp64, so each term is still (c·u) u."""
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    est = zo_gradient(
        lambda t: 1000.0 + c @ t,
        torch.zeros(3, dtype=torch.float64),
        sigma=1e-6,
        n=1,
        generator=torch.Generator().manual_seed(7),
    )
    u = torch.randn(3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(est, (c @ u) * u, rtol=1e-6, atol=0)


def test_n_estimates_average_and_global_rng_is_untouched():
    f, theta, _ = quadratic()
    state = torch.get_rng_state()
    mean_n = zo_gradient(f, theta, sigma=0.1, n=50, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # one stream continued over 50 single-direction calls
    singles = torch.stack([zo_gradient(f, theta, sigma=0.1, n=1, generator=gen) for _ in range(50)])
    torch.testing.assert_close(mean_n, singles.mean(0))
    zo_gradient(f, theta, sigma=0.1, n=3)  # the default generator is private too
    assert torch.equal(state, torch.get_rng_state())


def test_zo_gradient_rejects_bad_input():
    f, theta, _ = quadratic()
    with pytest.raises(GradkitError, match="sigma"):
        zo_gradient(f, theta, sigma=0.0, n=1)
    with pytest.raises(GradkitError, match="n must"):
        zo_gradient(f, theta, sigma=0.1, n=0)
    with pytest.raises(GradkitError, match="shape"):
        zo_gradient(lambda x: x * 2, theta, sigma=0.1, n=1)


def test_policy_gradient_loss_has_the_reinforce_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, 4, (8,), generator=g)
    rewards = torch.rand(8, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits.detach(), -1)
    onehot = torch.nn.functional.one_hot(actions, 4).double()
    for baseline, b in [(None, 0.0), ("mean", rewards.mean()), (0.25, 0.25)]:
        (grad,) = torch.autograd.grad(
            policy_gradient_loss(logits, actions, rewards, baseline=baseline), logits
        )
        # d/dlogits of -(r - b) log p(a) / B = -(r - b)(onehot(a) - p) / B
        expected = -((rewards - b).unsqueeze(1) * (onehot - probs) / 8).float()
        torch.testing.assert_close(grad.float(), expected)


def test_baselines_keep_the_expected_gradient():
    # exact expectation over every action of every example: no sampling noise
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    reward_table = torch.rand(3, 4, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    (exact,) = torch.autograd.grad((probs * reward_table).sum(1).mean(), logits)
    for baseline in (None, 0.7):
        total = torch.zeros_like(logits)
        for a in range(4):
            actions = torch.full((3,), a)
            loss = policy_gradient_loss(logits, actions, reward_table[:, a], baseline=baseline)
            (grad,) = torch.autograd.grad(loss, logits)
            total -= probs.detach()[:, a : a + 1] * grad
        torch.testing.assert_close(total, exact.float().double(), atol=1e-6, rtol=1e-5)


def test_policy_gradient_loss_rejects_bad_input():
    logits = torch.zeros(4, 3)
    with pytest.raises(GradkitError, match="must both be"):
        policy_gradient_loss(logits, torch.zeros(3, dtype=torch.long), torch.zeros(4))
    with pytest.raises(GradkitError, match="integer"):
        policy_gradient_loss(logits, torch.zeros(4), torch.zeros(4))
    with pytest.raises(GradkitError, match="baseline"):
        policy_gradient_loss(logits, torch.zeros(4, dtype=torch.long), torch.zeros(4), baseline="median")
    with pytest.raises(GradkitError, match="batch, classes"):
        policy_gradient_loss(torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.zeros(4))


def test_zeroth_order_on_accuracy_and_policy_gradient_point_the_same_way():
    """Accuracy of argmax predictions is piecewise constant (no gradient), yet both estimators see
    the gradient of a smoothed accuracy. Gaussian noise of std σ|x| on the logits (ZO, with unit-norm
    inputs) and softmax sampling at temperature T (Gumbel noise of scale T) smooth the argmax alike
    when their pairwise differences have the same spread: T π/√3 = √2 σ, i.e. T = √6 σ / π."""
    g = torch.Generator().manual_seed(0)
    n, d, c = 300, 5, 3
    x = torch.randn(n, d, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    teacher = 3.0 * torch.randn(d, c, generator=g)
    labels = (x @ teacher).argmax(1)
    w = teacher + 2.5 * torch.randn(d, c, generator=g)  # a student that gets about 65% right
    sigma = 0.3  # small against logits of scale ~3
    temperature = math.sqrt(6) * sigma / math.pi

    def accuracy(theta: torch.Tensor) -> torch.Tensor:
        return ((x @ theta.view(d, c)).argmax(1) == labels).float().mean()

    assert 0.5 < accuracy(w.flatten()) < 0.8
    zo = zo_gradient(accuracy, w.flatten(), sigma=sigma, n=6000, generator=torch.Generator().manual_seed(1))

    w = w.clone().requires_grad_(True)
    repeats = 200  # 200 sampled labels per example
    logits = ((x @ w) / temperature).repeat(repeats, 1)
    actions = torch.multinomial(
        torch.softmax(logits.detach(), -1), 1, generator=torch.Generator().manual_seed(2)
    ).squeeze(1)
    rewards = (actions == labels.repeat(repeats)).float()
    (pg,) = torch.autograd.grad(-policy_gradient_loss(logits, actions, rewards, baseline="mean"), w)

    cosine = torch.nn.functional.cosine_similarity(zo, pg.flatten(), dim=0).item()
    assert cosine >= 0.9, cosine
