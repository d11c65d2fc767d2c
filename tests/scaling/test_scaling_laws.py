"""Learning-rate / batch-size laws and the steps-examples fit against hand-computed values."""

from __future__ import annotations

import math

import pytest

from gradkit import GradkitError, lr_for_batch, steps_examples_tradeoff
from gradkit.scaling.laws import adam_lr_factor, adam_peak_batch, sgd_lr_factor, sign_expectation


def test_sgd_rule_hand_values():
    # lr * (1 + 100/10) / (1 + 100/1000) = 0.1 * 11 / 1.1 = 1.0
    assert lr_for_batch(0.1, 10, 1000, b_noise=100) == pytest.approx(1.0)
    # far below B_noise: linear scaling; far above: flat
    assert lr_for_batch(0.1, 1, 2, b_noise=1e9) == pytest.approx(0.2, rel=1e-6)
    assert lr_for_batch(0.1, 1e9, 2e9, b_noise=1) == pytest.approx(0.1, rel=1e-6)
    assert sgd_lr_factor(50, 50) == pytest.approx(0.5)


def test_sign_expectation_and_adam_factor_hand_values():
    # kappa^2 = 2/pi, B = 1: beta = (1 + 1)^(-1/2)
    k = math.sqrt(2 / math.pi)
    assert sign_expectation(1, k) == pytest.approx(2**-0.5)
    # beta_n = 0.5, beta = 2^-0.5: factor = 1 / (0.5 * (0.5 * sqrt2 + sqrt2^-1 / 0.5)) = 1 / (0.5 * (0.70711 + 1.41421))
    assert adam_lr_factor(1, k, 0.5) == pytest.approx(1 / (0.5 * (0.5 * math.sqrt(2) + 2**-0.5 / 0.5)))
    # peak where beta(B) = beta_n: B = pi k^2 beta_n^2 / (2 (1 - beta_n^2)) = 2 * .25 / (2 * .75) = 1/3
    assert adam_peak_batch(k, 0.5) == pytest.approx(1 / 3)
    assert adam_lr_factor(1 / 3, k, 0.5) == pytest.approx(1.0)
    assert adam_peak_batch(k, 1.0) == math.inf


def test_adam_rule_surge_sqrt_regime_and_monotone_case():
    kappa = math.sqrt(256.0)  # B_simple = 256
    # the peak sits at b_noise when b_noise is given
    lrs = {
        b: lr_for_batch(1e-3, 32, b, optimizer="adam", kappa=kappa, b_noise=256)
        for b in (64, 128, 256, 512, 4096)
    }
    assert lrs[256] == max(lrs.values())
    assert lrs[4096] < lrs[512] < lrs[256]  # the surge: past the peak the optimal lr falls
    # sqrt regime for B << kappa^2: doubling B multiplies the lr by about sqrt(2)
    small = lr_for_batch(1.0, 1, 2, optimizer="adam", kappa=1e4, b_noise=1e8)
    assert small == pytest.approx(math.sqrt(2), rel=1e-3)
    # beta_n >= 1: monotone increasing, saturating
    vals = [
        lr_for_batch(1.0, 8, b, optimizer="adam", kappa=10, beta_n=1.0) for b in (16, 64, 256, 4096, 10**6)
    ]
    assert all(a < b for a, b in zip(vals, vals[1:], strict=False))
    # hand value: kappa^2 = 2/pi so beta(B) = (1 + 1/B)^-1/2; beta_n = 1 -> factor = 2 beta / (1 + beta^2)
    k = math.sqrt(2 / math.pi)
    f = lambda b: 2 * (1 + 1 / b) ** -0.5 / (1 + 1 / (1 + 1 / b))  # noqa: E731
    assert lr_for_batch(0.3, 1, 3, optimizer="adam", kappa=k, beta_n=1.0) == pytest.approx(0.3 * f(3) / f(1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs b_noise"),
        ({"optimizer": "adam", "b_noise": 100}, "needs kappa"),
        ({"optimizer": "adam", "kappa": 3}, "exactly one of b_noise"),
        ({"optimizer": "adam", "kappa": 3, "b_noise": 10, "beta_n": 0.5}, "exactly one of b_noise"),
        ({"optimizer": "lion", "b_noise": 10}, "unknown optimizer"),
        ({"b_noise": -1}, "b_noise must be"),
    ],
)
def test_lr_for_batch_errors(kwargs, match):
    with pytest.raises(GradkitError, match=match) as err:
        lr_for_batch(0.1, 32, 64, **kwargs)
    assert "\n" not in str(err.value)


def test_tradeoff_recovers_exact_hyperbola():
    s_min, e_min = 1000.0, 64000.0  # B_crit = 64
    runs = [(s_min + e_min / b, (s_min + e_min / b) * b) for b in (8, 16, 32, 64, 128, 512)]
    fit = steps_examples_tradeoff(runs)
    assert fit.s_min == pytest.approx(s_min) and fit.e_min == pytest.approx(e_min)
    assert fit.b_crit == pytest.approx(64.0) and fit.rms_log_error < 1e-9 and fit.runs == 6
    for s, e in runs:  # every run lies on (S/Smin - 1)(E/Emin - 1) = 1
        assert (s / fit.s_min - 1) * (e / fit.e_min - 1) == pytest.approx(1.0)
    assert fit.steps(64) == pytest.approx(2000.0) and fit.examples(64) == pytest.approx(128000.0)
    # dict forms
    dicts = [{"steps": s, "batch_size": e / s} for s, e in runs[:3]]
    assert steps_examples_tradeoff(dicts).b_crit == pytest.approx(64.0)


def test_tradeoff_hand_fit_with_noise():
    # three runs; weighted least squares of S on 1/B with weights 1/S^2, computed by hand below
    runs = [(90.0, 90.0 * 10), (60.0, 60.0 * 20), (44.0, 44.0 * 40)]
    xs, ys = [0.1, 0.05, 0.025], [90.0, 60.0, 44.0]
    ws = [1 / y**2 for y in ys]
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sum(ws)
    my = sum(w * y for w, y in zip(ws, ys, strict=True)) / sum(ws)
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True)) / sum(
        w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True)
    )
    fit = steps_examples_tradeoff(runs)
    assert fit.e_min == pytest.approx(slope) and fit.s_min == pytest.approx(my - slope * mx)
    assert fit.b_crit == pytest.approx(slope / (my - slope * mx))


@pytest.mark.parametrize(
    "runs, match",
    [
        ([(10, 100), (20, 400)], "at least 3 runs"),
        ([(10, 100), (10, 100), (10, 100)], "same batch size"),
        ([(10, 100), (0, 100), (5, 100)], "steps=0"),
        ([(10, 100), (20, 10), (5, 100)], "fewer examples"),
        ([(10, 100), "x", (5, 100)], "pass \\(steps, examples\\)"),
        ([(50, 50 * 8), (100, 100 * 64), (200, 200 * 512)], "do not follow"),
        ({"steps": 1}, "list of"),
    ],
)
def test_tradeoff_errors(runs, match):
    with pytest.raises(GradkitError, match=match) as err:
        steps_examples_tradeoff(runs)
    assert "\n" not in str(err.value)
