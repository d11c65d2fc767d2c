"""ZerothOrder(estimator="svrg"): MeZO-SVRG's update against its closed form, the anchor schedule, the
control variate on a linear loss, exact restore, resume bit for bit, the anchor's bytes and bad input."""

from __future__ import annotations

import io

import pytest
import torch
from test_zeroth_order import bits, make_problem, same_bits

from gradkit import GradkitError, ZerothOrder
from gradkit.optim.zo_estimators import evaluations_per_step, svrg_differences
from gradkit.train.measures import optimizer_state_bytes


class Recorder:
    """f_I(w) = ½ |w − t_I|² on batch I (the anchor's batch: t_big), recording every point read."""

    def __init__(self, w: torch.nn.Parameter, targets: list[torch.Tensor], big: torch.Tensor):
        self.w, self.targets, self.big = w, targets, big
        self.reads: list[torch.Tensor] = []
        self.values: list[float] = []

    def closure(self, target: torch.Tensor):
        def evaluate() -> torch.Tensor:
            self.reads.append(self.w.detach().clone())
            value = 0.5 * (self.w - target).pow(2).sum()
            self.values.append(float(value))
            return value

        return evaluate


def make_recorder(seed: int = 0) -> Recorder:
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
    targets = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4)]
    return Recorder(w, targets, torch.stack(targets).mean(0))


def run(rec: Recorder, opt: ZerothOrder, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        target = rec.big if opt.anchor_due else rec.targets[s % len(rec.targets)]
        opt.step(rec.closure(target))


def test_differences_and_evaluations_follow_their_formulas():
    assert svrg_differences([3.0], [1.0], [2.0], [1.5]) == [1.0 - 0.25]
    assert evaluations_per_step("svrg", 2) == 8  # between anchors: θ ± εz and θ̄ ± εz per direction


def test_anchor_steps_come_every_svrg_every_steps():
    rec = make_recorder()
    opt = ZerothOrder([rec.w], lr=1e-2, estimator="svrg", svrg_every=3)
    due = []
    for s in range(7):
        due.append(opt.anchor_due)
        target = rec.big if due[-1] else rec.targets[s % 4]
        opt.step(rec.closure(target))
    assert due == [True, False, False, True, False, False, True]
    assert len(rec.reads) == 2 + 4 + 4 + 2 + 4 + 4 + 2


def test_a_step_between_anchors_equals_the_closed_form():
    """Quadratic f_I: the points read give z, z̄ and θ̄ back, and the step must be
    θ - lr ((f(θ+εz) - f(θ-εz) - f(θ̄+εz) + f(θ̄-εz)) / 2ε · z + (f_big(θ̄+εz̄) - f_big(θ̄-εz̄)) / 2ε · z̄)."""
    rec = make_recorder()
    lr, eps = 0.05, 1e-3
    opt = ZerothOrder([rec.w], lr=lr, eps=eps, estimator="svrg", svrg_every=4, seed=3)
    run(rec, opt, 2)  # the anchor step, then one step in between
    (a_plus, a_minus, p, m, bp, bm), f = rec.reads, rec.values
    anchor = (a_plus + a_minus) / 2
    z_bar, z = (a_plus - anchor) / eps, (p - m) / (2 * eps)
    theta = (p + m) / 2
    torch.testing.assert_close((bp + bm) / 2, anchor, rtol=0, atol=1e-12)  # θ̄ is the anchor step's θ
    torch.testing.assert_close((bp - bm) / (2 * eps), z, rtol=0, atol=1e-9)  # the same z at θ̄
    torch.testing.assert_close(theta, anchor - lr * (f[0] - f[1]) / (2 * eps) * z_bar, rtol=0, atol=1e-12)
    expected = theta - lr * ((f[2] - f[3] - f[4] + f[5]) / (2 * eps) * z + (f[0] - f[1]) / (2 * eps) * z_bar)
    torch.testing.assert_close(rec.w.detach(), expected, rtol=0, atol=1e-12)


def test_on_a_linear_loss_every_step_between_anchors_repeats_the_anchor_step():
    """f_I(w) = c_I · w: the minibatch's difference at θ and at θ̄ cancel exactly whatever c_I, so each
    step in between moves by the anchor step's own move divided by anchor_lr_scale."""
    w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    slopes = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)]
    opt = ZerothOrder([w], lr=1e-2, estimator="svrg", svrg_every=4, anchor_lr_scale=2.0)
    positions = [w.detach().clone()]
    for s in range(4):
        c = torch.stack(slopes).mean(0) if opt.anchor_due else slopes[s % 3]
        opt.step(lambda c=c: (c * w).sum())
        positions.append(w.detach().clone())
    moves = [b - a for a, b in zip(positions, positions[1:], strict=False)]
    for move in moves[1:]:
        torch.testing.assert_close(move, moves[0] / 2.0, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lr_zero_steps_leave_every_bit_and_the_anchor_is_theta(dtype):
    net, closure = make_problem(dtype)
    before = bits(net)
    opt = ZerothOrder(net.parameters(), lr=0.0, eps=1e-2, estimator="svrg", svrg_every=2, weight_decay=0.1)
    for _ in range(3):
        assert torch.isfinite(opt.step(closure))
    assert same_bits(before, bits(net))
    assert all(torch.equal(opt.state[p]["svrg_anchor"], p) for p in net.parameters())
    assert all(opt.state[p]["svrg_anchor"].data_ptr() != p.data_ptr() for p in net.parameters())


def test_the_anchor_is_one_copy_of_the_parameters_in_the_state_bytes():
    net, closure = make_problem()
    opt = ZerothOrder(net.parameters(), lr=1e-3, estimator="svrg")
    opt.step(closure)
    assert optimizer_state_bytes(opt) == sum(p.numel() * p.element_size() for p in net.parameters())


def test_resume_between_anchors_is_bit_for_bit():
    def fresh():
        rec = make_recorder(seed=2)
        return rec, ZerothOrder([rec.w], lr=0.05, estimator="svrg", svrg_every=3, seed=9)

    rec, opt = fresh()
    run(rec, opt, 7)
    straight = rec.w.detach().clone()

    rec, opt = fresh()
    run(rec, opt, 5)  # stop after the first step past the second anchor
    buffer = io.BytesIO()
    torch.save({"w": rec.w.detach().clone(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    rec, opt = fresh()
    with torch.no_grad():
        rec.w.copy_(saved["w"])
    opt.load_state_dict(saved["opt"])
    run(rec, opt, 2, start=5)
    assert torch.equal(rec.w.detach(), straight)


def test_exact_parameters_take_their_gradient_at_theta_only():
    """Loss (h·x)(w·y): at a step between anchors the head's update must be -lr_h x (w·y) with w the
    step's θ (the mean over θ ± εz of a loss linear in w), not also the gradient at θ̄."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    h = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    w = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    lr_h = 0.1
    opt = ZerothOrder([w], lr=0.05, estimator="svrg", exact_params=[{"params": [h], "lr": lr_h}])

    def closure():
        return (h * x).sum() * (w * y).sum()

    opt.step(closure)  # the anchor step: θ̄ is this θ, and θ moves
    theta, head = w.detach().clone(), h.detach().clone()
    assert not torch.equal(theta, opt.state[w]["svrg_anchor"])
    opt.step(closure)
    torch.testing.assert_close(h.detach(), head - lr_h * x * float((theta * y).sum()), rtol=1e-12, atol=0)


def test_bad_svrg_settings_are_refused():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(GradkitError, match="restore='exact'"):
        ZerothOrder([w], estimator="svrg", restore="subtract")
    with pytest.raises(GradkitError, match="svrg_every must be an integer >= 1"):
        ZerothOrder([w], estimator="svrg", svrg_every=0)
    with pytest.raises(GradkitError, match="anchor_lr_scale must be finite and > 0"):
        ZerothOrder([w], estimator="svrg", anchor_lr_scale=float("nan"))
