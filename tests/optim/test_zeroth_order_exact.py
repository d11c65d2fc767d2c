"""ZerothOrder with exact parameter groups: the exact part is SGD on the closure's autograd gradient
(at θ for fzoo, averaged over the ±ε z pairs for spsa), autograd never records the zeroth-order
parameters, resume, bad input, and a head trained exactly beside a zeroth-order body."""

from __future__ import annotations

import io

import pytest
import torch
from test_zeroth_order import bits, same_bits
from torch import nn

from gradkit import GradkitError, ZerothOrder


class BodyHead(nn.Module):
    """logits = head(tanh(body(x))): a body for zeroth order and a head for the exact gradient."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.body = nn.Linear(6, 8).to(dtype)
            self.head = nn.Linear(8, 3).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=dtype)
    return x, (x[:, :3] * torch.tensor([1.0, -1.0, 0.5], dtype=dtype)).argmax(1)


def head_gradient(model: BodyHead, x, y) -> list[torch.Tensor]:
    loss = nn.functional.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.head.parameters()))]


@pytest.mark.parametrize("estimator", ["spsa", "fzoo"])
def test_exact_head_takes_the_sgd_step_of_its_gradient_at_theta(estimator):
    """fzoo takes the head's gradient at its base evaluation f(θ): the step is exact. spsa averages it
    over θ ± ε z_k, equal to the gradient at θ up to O(ε²) (first-order terms cancel in each pair)."""
    model, (x, y) = BodyHead(), data()
    lr_head, lr_body = 0.5, 1e-5
    before = [p.detach().clone() for p in model.head.parameters()]
    body_before = model.body.weight.detach().clone()
    grads = head_gradient(model, x, y)
    n = 2 if estimator == "spsa" else 3
    opt = ZerothOrder(
        model.body.parameters(),
        lr=lr_body,
        n_samples=n,
        estimator=estimator,
        exact_params=[{"params": model.head.parameters(), "lr": lr_head}],
    )
    opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    tol = 1e-14 if estimator == "fzoo" else 1e-6  # spsa: O(ε²) = 1e-6 around a gradient of order 0.1
    for p, b, g in zip(model.head.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - lr_head * g, rtol=0, atol=tol)
    assert not torch.equal(model.body.weight.detach(), body_before)  # the body moved by zeroth order


def test_spsa_average_is_exactly_the_gradient_when_the_head_does_not_see_the_body():
    """A separable loss (body term + head term): every evaluation has the same head gradient, and the
    1/(2n) weights sum it back exactly."""
    model, (x, y) = BodyHead(), data()
    target = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def closure() -> torch.Tensor:
        features = torch.tanh(x[:, :8].new_zeros(64, 8) + 1.0)  # fixed features, no body
        head = nn.functional.cross_entropy(model.head(features), y)
        return head + ((model.body.weight - target) ** 2).sum()

    before = [p.detach().clone() for p in model.head.parameters()]
    with torch.enable_grad():
        grads = torch.autograd.grad(closure(), list(model.head.parameters()))
    opt = ZerothOrder([model.body.weight], lr=1e-4, n_samples=4, exact_params=model.head.parameters())
    opt.step(closure)
    for p, b, g in zip(model.head.parameters(), before, grads, strict=True):
        assert torch.equal(p.detach(), b - 1e-4 * g)


def test_autograd_records_nothing_of_the_zeroth_order_parameters():
    model, (x, y) = BodyHead(), data()
    observed = []

    def closure() -> torch.Tensor:
        features = torch.tanh(model.body(x))
        observed.append((features.requires_grad, model.body.weight.requires_grad))
        return nn.functional.cross_entropy(model.head(features), y)

    opt = ZerothOrder(model.body.parameters(), lr=1e-4, exact_params=model.head.parameters())
    opt.step(closure)
    assert observed == [(False, False), (False, False)]  # no graph through the body
    assert model.body.weight.requires_grad and model.head.weight.requires_grad  # flags put back
    assert model.head.weight.grad is None  # the gradient was taken, not accumulated in .grad


def test_exact_groups_decay_like_the_rest():
    model, (x, _) = BodyHead(), data()
    opt = ZerothOrder(
        model.body.parameters(),
        lr=0.1,
        weight_decay=0.5,
        exact_params=[{"params": model.head.parameters(), "lr": 0.2}],
    )
    before = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    opt.step(lambda: model(x).sum() * 0 + 1)  # a constant loss: zero gradient, the decay alone
    torch.testing.assert_close(model.head.weight.detach(), before[0] * (1 - 0.2 * 0.5))
    assert torch.equal(model.head.bias.detach(), before[1])  # 1-D: no decay


def test_resumed_hybrid_run_takes_exactly_the_same_steps():
    x, y = data(torch.float32)

    def build(seed: int):
        model = BodyHead(torch.float32)
        opt = ZerothOrder(
            model.body.parameters(),
            lr=1e-4,
            n_samples=2,
            estimator="fzoo",
            seed=seed,
            exact_params=[{"params": model.head.parameters(), "lr": 0.1}],
        )
        return model, opt, (lambda: nn.functional.cross_entropy(model(x), y))

    model, opt, closure = build(0)
    for _ in range(2):
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(2):
        opt.step(closure)
    model2, opt2, closure2 = build(7)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[1]["exact"] and opt2.param_groups[1]["lr"] == 0.1
    for _ in range(2):
        opt2.step(closure2)
    assert same_bits(bits(model), bits(model2))


def test_an_exact_head_learns_far_faster_than_a_zeroth_order_one():
    """The same body lr, the same forwards: a head trained by its exact gradient reaches a much lower
    loss than the head trained by the zeroth-order estimate."""
    x, y = data(torch.float32)
    finals = {}
    for hybrid in (False, True):
        model = BodyHead(torch.float32)
        body, head = list(model.body.parameters()), list(model.head.parameters())
        if hybrid:
            opt = ZerothOrder(body, lr=1e-2, n_samples=2, exact_params=[{"params": head, "lr": 0.5}])
        else:
            opt = ZerothOrder(body + head, lr=1e-2, n_samples=2)
        for _ in range(100):
            opt.step(lambda model=model: nn.functional.cross_entropy(model(x), y))
        with torch.no_grad():
            finals[hybrid] = nn.functional.cross_entropy(model(x), y).item()
    assert finals[True] < 0.5 * finals[False], finals  # 0.28 against 0.92 with these seeds


def test_bad_exact_arguments_are_clear_errors():
    model, (x, y) = BodyHead(), data()
    with pytest.raises(GradkitError, match="every parameter of ZerothOrder is exact"):
        ZerothOrder([{"params": model.parameters(), "exact": True}])
    opt = ZerothOrder(model.body.parameters(), exact_params=model.head.parameters())
    with pytest.raises(GradkitError, match="does not depend on them through autograd"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y).detach())
    assert model.body.weight.requires_grad  # flags put back after the error
