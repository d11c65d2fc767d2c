"""ZerothOrder(estimator="fzoo"): the update against its closed form, the base evaluation at θ itself,
the σ = 0 case, restore modes, resume, bad input and a loss that goes down."""

from __future__ import annotations

import io
import statistics

import pytest
import torch
from test_zeroth_order import Linear1D, bits, make_problem, same_bits, small_classifier

from gradkit import GradkitError, ZerothOrder
from gradkit.optim.zo_estimators import evaluations_per_step, fzoo_differences, spsa_differences


def test_differences_follow_their_formulas():
    assert spsa_differences([3.0, 1.0], [1.0, 2.0]) == [1.0, -0.5]
    diffs, sigma = fzoo_differences(1.0, [1.5, 0.5, 2.0])
    assert sigma == pytest.approx(statistics.stdev([1.5, 0.5, 2.0]))
    assert diffs == pytest.approx([0.5 / sigma, -0.5 / sigma, 1.0 / sigma])
    assert fzoo_differences(1.0, [2.0, 2.0]) == ([0.0, 0.0], 0.0)  # equal probes: no direction
    assert (evaluations_per_step("spsa", 4), evaluations_per_step("fzoo", 4)) == (8, 5)


def test_one_coordinate_step_equals_the_closed_form():
    """f(θ) = c θ with θ scalar and Rademacher z_k = ±1: the probes are f_0 + ε c z_k, so z_k is read
    back from the projected gradients (z_k = proj_k / c) and the step must be exactly
    -lr / (n σ) Σ_k proj_k z_k with σ the probes' sample standard deviation."""
    c = torch.tensor([2.0], dtype=torch.float64)
    model = Linear1D(c)
    lr, n = 1e-2, 6
    opt = ZerothOrder(model.parameters(), lr=lr, eps=1e-3, n_samples=n, estimator="fzoo", seed=5)
    opt.step(model)
    proj = opt.last_projected_grads
    zs = [p / 2.0 for p in proj]
    assert sorted({round(z) for z in zs}) == [-1, 1]  # both signs drawn: σ > 0
    probes = [1e-3 * p for p in proj]  # f_k - f_0 (f_0 = 0)
    assert opt.last_sigma == pytest.approx(statistics.stdev(probes), rel=1e-12)
    expected = -lr / (n * opt.last_sigma) * sum(p * z for p, z in zip(proj, zs, strict=True))
    assert float(model.w.detach()) == pytest.approx(expected, rel=1e-12)


def test_the_step_is_a_normalised_gradient_step_on_a_linear_loss():
    """f(θ) = c·θ, Rademacher probes: f_k - f_0 = ε c·z_k and σ → ε |c| as n grows, so the step tends to
    -(lr / ε) c / |c| (normalised SGD, the paper's reading), whatever the scale of c."""
    for scale in (1e-3, 1e3):
        c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) * scale
        model = Linear1D(c)
        lr = 1e-2
        opt = ZerothOrder(model.parameters(), lr=lr, eps=1e-3, n_samples=4000, estimator="fzoo")
        opt.step(model)
        torch.testing.assert_close(model.w.detach() / (-lr / 1e-3), c / c.norm(), atol=0.08, rtol=0)


def test_base_evaluation_reads_theta_itself_then_n_probes():
    net, closure = make_problem(torch.float64)
    theta = [p.detach().clone() for p in net.parameters()]
    seen: list[bool] = []

    def recording() -> torch.Tensor:
        seen.append(all(torch.equal(p, t) for p, t in zip(net.parameters(), theta, strict=True)))
        return closure()

    opt = ZerothOrder(net.parameters(), lr=1e-2, n_samples=3, estimator="fzoo", restore="subtract")
    opt.step(recording)
    assert seen == [True, False, False, False]  # f(θ), then three probes at θ + ε z_k
    assert opt.distribution == "rademacher"  # FZOO's law unless told otherwise


def test_returned_loss_is_the_base_evaluation():
    net, closure = make_problem(torch.float64)
    at_theta = closure().item()
    opt = ZerothOrder(net.parameters(), lr=1e-2, n_samples=2, estimator="fzoo")
    assert float(opt.step(closure)) == pytest.approx(at_theta, rel=1e-6)  # fp32 of the fp64 loss


def test_equal_probes_give_no_zeroth_order_step_but_the_decay():
    net, _ = make_problem()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = ZerothOrder(net.parameters(), lr=0.1, weight_decay=0.5, n_samples=2, estimator="fzoo")
    tokens = torch.zeros(2, 5, dtype=torch.long)
    opt.step(lambda: net(tokens).sum() * 0 + 1)
    assert opt.last_sigma == 0.0
    for name, param in net.named_parameters():
        factor = 1 - 0.1 * 0.5 if param.ndim >= 2 else 1.0
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)


def test_exact_and_subtract_restore_take_the_same_step_in_fp64():
    steps = {}
    for restore in ("exact", "subtract"):
        net, closure = make_problem(torch.float64)
        opt = ZerothOrder(net.parameters(), lr=1e-2, n_samples=3, estimator="fzoo", restore=restore, seed=2)
        for _ in range(2):
            opt.step(closure)
        steps[restore] = [p.detach().clone() for p in net.parameters()]
    for a, b in zip(steps["exact"], steps["subtract"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_lr_zero_leaves_every_bit_in_bf16():
    net, closure = make_problem(torch.bfloat16)
    before = bits(net)
    opt = ZerothOrder(net.parameters(), lr=0.0, n_samples=2, estimator="fzoo")
    opt.step(closure)
    assert same_bits(before, bits(net))
    assert any(abs(g) > 0 for g in opt.last_projected_grads)  # the probes did see perturbed weights


def test_resumed_run_takes_exactly_the_same_steps():
    kw = dict(lr=1e-2, n_samples=3, weight_decay=0.01, estimator="fzoo")
    net, closure = make_problem()
    opt = ZerothOrder(net.parameters(), **kw)
    for _ in range(2):
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(2):
        opt.step(closure)
    straight = bits(net)
    net2, closure2 = make_problem()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    net2.load_state_dict(saved["model"])
    opt2 = ZerothOrder(net2.parameters(), **{**kw, "seed": 99})
    opt2.load_state_dict(saved["opt"])
    for _ in range(2):
        opt2.step(closure2)
    assert opt2.estimator == "fzoo" and same_bits(straight, bits(net2))


def test_loss_goes_down_on_a_small_classifier():
    model, closure = small_classifier()
    first = closure().item()
    # the step is about lr / ε per unit direction whatever the gradient's scale (σ-normalised)
    opt = ZerothOrder(model.parameters(), lr=2e-5, eps=1e-3, n_samples=4, estimator="fzoo")
    for _ in range(300):
        opt.step(closure)
    assert closure().item() < 0.2 * first  # 1.10 -> 0.096 in 1,500 forwards with these seeds


def test_bad_estimator_arguments_are_clear_errors():
    net, _ = make_problem()
    with pytest.raises(GradkitError, match="unknown estimator 'fzo'"):
        ZerothOrder(net.parameters(), estimator="fzo")
    with pytest.raises(GradkitError, match=">= 2 for estimator 'fzoo'"):
        ZerothOrder(net.parameters(), estimator="fzoo", n_samples=1)


def test_cli_choices_match_the_library():
    from gradkit.optim import zo_estimators
    from gradkit.train import method_options

    assert method_options.ZO_ESTIMATORS == zo_estimators.ESTIMATORS
    defaults = method_options.ZO_DEFAULT_SAMPLES
    assert set(defaults) == set(zo_estimators.ESTIMATORS)
    assert all(defaults[e] >= zo_estimators.MIN_SAMPLES[e] for e in defaults)
