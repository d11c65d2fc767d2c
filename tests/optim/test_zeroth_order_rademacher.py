"""ZerothOrder with Rademacher (±1) directions (Spall 1992): the draws, an unbiased estimate with the
variance the theory gives against Gaussian z, the option's plumbing, and the main behaviour tests of
test_zeroth_order.py (exact restore in every dtype, sparse embedding rows, tied weights, resume)
run again with ``distribution="rademacher"`` as the default."""

from __future__ import annotations

import io

import pytest
import torch
from test_zeroth_order import (  # noqa: F401 - fixtures and tests collected again under the fixture below
    chunking,
    test_exact_and_subtract_evaluate_the_same_points_in_fp32,
    test_lookups_of_other_rows_in_one_step_share_the_steps_direction,
    test_lr_zero_step_with_exact_restore_is_bit_identical,
    test_parameters_read_outside_their_module_are_perturbed_and_updated,
    test_reads_outside_modules_are_restored_bit_for_bit,
    test_resumed_run_takes_exactly_the_same_steps,
    test_sparse_embeddings_update_used_rows_without_bias_and_leave_the_rest_alone,
    test_tied_embedding_uses_one_z_for_the_lookup_and_the_head,
    test_tied_head_estimate_is_unbiased_against_autograd,
    test_update_is_unbiased_with_n_samples_and_per_group_eps,
)
from torch import nn

from gradkit import GradkitError, ZerothOrder
from gradkit.optim.zo_directions import DISTRIBUTIONS, Directions


@pytest.fixture(autouse=True)
def rademacher_by_default(monkeypatch):
    """Every ZerothOrder built in this module draws ±1 directions unless told otherwise."""
    defaults = dict(ZerothOrder.__init__.__kwdefaults__)
    defaults["distribution"] = "rademacher"
    monkeypatch.setattr(ZerothOrder.__init__, "__kwdefaults__", defaults)


def test_the_fixture_applies():
    assert ZerothOrder([nn.Parameter(torch.zeros(2))]).distribution == "rademacher"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [1, 7, 64, 1000, 4097])
def test_draws_are_signs_with_identity_second_moment(dtype, n):
    directions = Directions("rademacher")
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([directions.draw((n,), gen, torch.device("cpu"), dtype) for _ in range(2000)])
    assert draws.dtype == dtype and draws.shape == (2000, n)
    assert bool(((draws == 1) | (draws == -1)).all())
    if n >= 64:  # E[z] = 0 and E[z zᵀ] = I within Monte-Carlo error (2000 draws: sd 0.022)
        assert float(draws.mean(0).abs().max()) < 0.12
        second = draws[:, :64].T @ draws[:, :64] / 2000
        torch.testing.assert_close(second, torch.eye(64, dtype=dtype), atol=0.12, rtol=0)


def test_draws_are_regenerated_from_the_seed_and_differ_between_seeds():
    directions = Directions("rademacher")
    gen = torch.Generator()
    a = directions.draw((3, 50), gen.manual_seed(5), torch.device("cpu"), torch.float32)
    b = directions.draw((3, 50), gen.manual_seed(5), torch.device("cpu"), torch.float32)
    c = directions.draw((3, 50), gen.manual_seed(6), torch.device("cpu"), torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _estimates(distribution: str, g: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n single-sample SPSA estimates of the gradient of f(θ) = gᵀθ + ½|θ|² at θ = 0 (the central
    difference is exact on a quadratic: ĝ = (gᵀz) z)."""
    theta = nn.Parameter(torch.zeros_like(g))
    opt = ZerothOrder([theta], lr=1.0, eps=1e-3, seed=seed, distribution=distribution)
    out = torch.empty(n, len(g), dtype=g.dtype)
    for k in range(n):
        with torch.no_grad():
            theta.zero_()
        opt.step(lambda: g @ theta + 0.5 * theta @ theta)
        out[k] = -theta.detach()
    return out


def test_rademacher_estimate_is_unbiased_with_the_smaller_variance_theory_gives():
    """E[ĝ] = g for both laws; E|ĝ − g|² = (d − 1)|g|² for ±1 z and (d + 1)|g|² for Gaussian z
    (E[(gᵀz)²|z|²] is d|g|² and (d + 2)|g|²), measured here in the same run."""
    gen = torch.Generator().manual_seed(0)
    d, n = 6, 6000
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    error = {}
    for distribution in DISTRIBUTIONS:
        est = _estimates(distribution, g, n, seed=1)
        # the mean: per-coordinate sd about |g| sqrt(d/n) / sqrt(d) ≈ 0.013 |g|·sqrt(d)
        se = float(g.norm()) * (d / n) ** 0.5
        assert float((est.mean(0) - g).abs().max()) < 4 * se, distribution
        error[distribution] = float((est - g).pow(2).sum(1).mean() / g.pow(2).sum())
    assert error["rademacher"] == pytest.approx(d - 1, rel=0.08)
    assert error["gaussian"] == pytest.approx(d + 1, rel=0.12)
    assert error["rademacher"] < error["gaussian"]


def test_the_distribution_is_saved_and_restored():
    theta = nn.Parameter(torch.ones(3))
    opt = ZerothOrder([theta], lr=0.1, distribution="rademacher")
    opt.step(lambda: theta.pow(2).sum())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other = ZerothOrder([nn.Parameter(torch.ones(3))], lr=0.1, distribution="gaussian")
    other.load_state_dict(torch.load(buffer, weights_only=False))
    assert other.distribution == "rademacher" and other.steps == 1


def test_a_rademacher_step_moves_every_coordinate_by_the_same_amount():
    """|z_i| = 1: one sample moves each coordinate by exactly ±lr·proj (fp64, a linear objective)."""
    theta = nn.Parameter(torch.zeros(10, dtype=torch.float64))
    c = torch.arange(1.0, 11.0, dtype=torch.float64)
    opt = ZerothOrder([theta], lr=1e-3, eps=1e-3, distribution="rademacher")
    opt.step(lambda: c @ theta)
    moved = theta.detach().abs()
    torch.testing.assert_close(moved, moved[:1].expand(10), rtol=1e-12, atol=0)
    assert float(moved[0]) > 0


def test_unknown_distribution_is_a_clear_error():
    with pytest.raises(GradkitError, match="distribution"):
        ZerothOrder([nn.Parameter(torch.zeros(2))], distribution="uniform")


def test_cli_choices_match_the_library():
    from gradkit.optim import zeroth_order
    from gradkit.train import method_options

    assert method_options.ZO_DISTRIBUTIONS == zeroth_order.DISTRIBUTIONS == DISTRIBUTIONS
