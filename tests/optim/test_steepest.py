"""SteepestDescent: each step solves max ⟨g, d⟩ over ‖d‖ ≤ lr (duality, feasibility, no random
feasible d does better), momentum/Nesterov/weight decay formulas, Newton–Schulz accuracy, state_dict."""

from __future__ import annotations

import copy

import pytest
import torch

import gradkit
from gradkit.errors import GradkitError
from gradkit.optim.steepest import dual_norm_of, norm_of, orthogonalize, orthogonalize_exact

SHAPES = [(7,), (5, 3), (3, 8), (4, 2, 3)]
NORMS = ["l2", "rms", "linf", "spectral"]


def one_step(g: torch.Tensor, norm: str, lr: float, **kw) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros_like(g))
    opt = gradkit.optim.SteepestDescent([p], lr=lr, norm=norm, **kw)
    p.grad = g.clone()
    opt.step()
    return -p.detach()  # the move d with θ ← θ − d


def random_feasible(shape, norm, gen) -> torch.Tensor:
    """A random d with ‖d‖ = 1 in ``norm`` (random direction scaled onto the unit sphere)."""
    d = torch.randn(shape, generator=gen, dtype=torch.float64)
    if norm == "linf" and torch.rand((), generator=gen) < 0.5:
        d = torch.sign(d) * torch.rand(shape, generator=gen, dtype=torch.float64) ** 0.1  # near the corners
    return d / norm_of(d, norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("foreach", [True, False])
def test_each_step_attains_the_dual_norm_and_no_feasible_direction_beats_it(norm, shape, foreach):
    gen = torch.Generator().manual_seed(hash((norm, shape)) % 2**31)
    lr = 0.37
    for _ in range(3):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        d = one_step(g, norm, lr, foreach=foreach)
        value = (g * d).sum()
        assert value == pytest.approx(float(lr * dual_norm_of(g, norm)), rel=1e-10)
        assert float(norm_of(d, norm)) == pytest.approx(lr, rel=1e-10)
        best_random = max(float((g * (lr * random_feasible(shape, norm, gen))).sum()) for _ in range(500))
        assert best_random <= value * (1 + 1e-12)


def test_dual_norms_are_the_textbook_ones():
    g = torch.tensor([[3.0, -4.0], [0.0, 0.0]], dtype=torch.float64)
    assert float(dual_norm_of(g, "l2")) == pytest.approx(5.0)
    assert float(dual_norm_of(g, "rms")) == pytest.approx(10.0)  # sqrt(4) * 5
    assert float(dual_norm_of(g, "linf")) == pytest.approx(7.0)
    assert float(dual_norm_of(g, "spectral")) == pytest.approx(5.0)  # rank one: nuclear = spectral


def test_the_step_directions():
    g = torch.tensor([[2.0, -0.5, 0.0]], dtype=torch.float64)
    assert torch.equal(one_step(g, "linf", 0.1), 0.1 * torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(one_step(g, "l2", 0.1), 0.1 * g / g.norm())
    assert torch.allclose(one_step(g, "rms", 0.1), 0.1 * 3**0.5 * g / g.norm())
    m = torch.randn(6, 4, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    assert torch.allclose(one_step(m, "spectral", 0.1), 0.1 * u @ vh)
    b = torch.randn(5, dtype=torch.float64)  # 1-D under spectral: an n×1 matrix, so the l2 step
    assert torch.allclose(one_step(b, "spectral", 0.1), one_step(b, "l2", 0.1))
    for norm in NORMS:
        assert torch.equal(one_step(torch.zeros(3, 2), norm, 0.1), torch.zeros(3, 2))


def test_rank_deficient_spectral_step_keeps_only_the_gradients_directions():
    u = torch.randn(6, 1, dtype=torch.float64)
    v = torch.randn(1, 4, dtype=torch.float64)
    g = u @ v + u @ (2 * v)  # rank one
    d = one_step(g, "spectral", 1.0)
    assert torch.allclose(d, (u / u.norm()) @ (v / v.norm()), atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 9, 3), (4, 3, 9), (3, 6, 6), (2, 1, 7)])
def test_the_exact_factor_of_a_batch_is_each_matrixs_svd_factor(shape):
    # Thin QR, then the SVD of the small triangle: U Vᵀ of the direct SVD, matrix by matrix.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    batched = orthogonalize_exact(x)
    for matrix, d in zip(x, batched, strict=True):
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        assert torch.allclose(d, u @ vh, atol=1e-13)
        assert torch.allclose(d, orthogonalize_exact(matrix), atol=1e-14)  # batched: its matrices alone
    assert torch.equal(orthogonalize_exact(torch.zeros(3, 4, 2)), torch.zeros(3, 4, 2))


def test_the_batched_spectral_step_equals_the_step_tensor_by_tensor():
    # foreach batches the matrices of one shape (LoRA's factors); the loop takes them one at a time.
    gen = torch.Generator().manual_seed(5)
    shapes = [(8, 24), (24, 8), (8, 24), (6,), (24, 8), (3, 2, 4), (40, 40), (8, 24)]
    grads = [torch.randn(shape, generator=gen) for shape in shapes] + [torch.zeros(8, 24)]
    moves = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        opt = gradkit.optim.SteepestDescent(
            params, lr=0.1, norm="spectral", momentum=0.9, nesterov=True, svd_max=16, foreach=foreach
        )
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        moves.append([p.detach().clone() for p in params])
    for batched, one_by_one in zip(*moves, strict=True):  # the same float64 arithmetic, batched or not
        assert torch.allclose(batched, one_by_one, rtol=0, atol=1e-7)
    assert torch.equal(moves[0][-1], torch.zeros(8, 24))


def test_newton_schulz_matches_the_svd_for_large_matrices():
    gen = torch.Generator().manual_seed(0)
    m, n = 300, 400
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -2.5, m, dtype=torch.float64)  # σ_min / ‖g‖_F ≈ 4e-4, the documented bound
    g = ((u * s) @ v.T).float()
    assert float(s.min() / s.norm()) > 4e-4
    for mat in (g, g.T):
        o = orthogonalize(mat, svd_max=64).double()
        exact = orthogonalize(mat.double(), svd_max=1000)
        assert (o - exact).norm() / exact.norm() < 1e-5
        assert torch.linalg.svdvals(o).sub(1).abs().max() < 1e-5


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_is_taken_on_the_buffer(nesterov):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))
    opt = gradkit.optim.SteepestDescent(
        [p], lr=0.1, norm="l2", momentum=0.8, nesterov=nesterov, weight_decay=0.5
    )
    buf = torch.zeros_like(p)
    theta = p.detach().clone()
    for _ in range(4):
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        buf = 0.8 * buf + g
        m = g + 0.8 * buf if nesterov else buf
        theta = theta * (1 - 0.1 * 0.5) - 0.1 * m / m.norm()
        assert torch.allclose(p.detach(), theta, atol=1e-12)


def test_state_dict_round_trip_resumes_exactly():
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(2)), torch.randn(16, 2)

    def run(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    a = make()
    opt_a = gradkit.optim.SteepestDescent(
        a.parameters(), lr=0.01, norm="spectral", momentum=0.9, nesterov=True
    )
    run(a, opt_a, 3)
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    run(a, opt_a, 4)
    b = make()
    b.load_state_dict(saved_model)
    opt_b = gradkit.optim.SteepestDescent(b.parameters(), lr=0.5, norm="l2")
    opt_b.load_state_dict(saved_opt)
    run(b, opt_b, 4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_a_loss_goes_down_with_each_norm():
    for norm, lr in (("l2", 0.05), ("rms", 0.01), ("linf", 0.005), ("spectral", 0.03)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        x = torch.randn(64, 6)
        y = x[:, :1] * 2 - x[:, 1:2]
        opt = gradkit.optim.SteepestDescent(model.parameters(), lr=lr, norm=norm, momentum=0.9)
        first = None
        for _ in range(60):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            first = first if first is not None else loss.item()
        assert loss.item() < 0.5 * first, norm


def test_bad_settings():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kw in (
        dict(norm="l1"),
        dict(lr=-1.0),
        dict(momentum=1.0),
        dict(nesterov=True),
        dict(weight_decay=-1.0),
    ):
        with pytest.raises(GradkitError):
            gradkit.optim.SteepestDescent(p, **{"lr": 0.1, **kw})


@pytest.mark.parametrize(("dtype", "shape"), [(torch.bfloat16, (64, 32)), (torch.float16, (256, 1024))])
def test_low_precision_spectral_step_keeps_every_direction(dtype, shape):
    # The exact factor is computed in float64 on g's exact values, so a full-rank bf16/fp16 g keeps all its directions.
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    d = one_step(g, "spectral", 1.0).double()
    nuclear = float(dual_norm_of(g.double(), "spectral"))
    assert float((g.double() * d).sum()) == pytest.approx(nuclear, rel=1e-2)
    assert torch.linalg.svdvals(d).sub(1).abs().max() < 2e-2


@pytest.mark.parametrize("norm", ["l2", "rms", "spectral"])
@pytest.mark.parametrize("foreach", [True, False])
def test_fp16_gradient_whose_norm_overflows_fp16_still_steps(norm, foreach):
    g = torch.full((1000,), 3000.0, dtype=torch.float16)  # ‖g‖₂ ≈ 94868 > fp16's max 65504
    d = one_step(g, norm, 0.1, foreach=foreach).float()
    assert float(norm_of(d, "l2" if norm == "spectral" else norm)) == pytest.approx(0.1, rel=1e-3)
    assert torch.allclose(d, torch.full_like(d, d[0].item())) and d[0] > 0


def test_newton_schulz_error_below_the_exact_range_is_the_documented_one():
    # f(σ) = u_iᵀ O v_i for each singular pair; the docstring's table of |f − 1| by σ/‖g‖_F.
    gen = torch.Generator().manual_seed(1)
    m, n = 300, 400
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -4, m, dtype=torch.float64)
    rel = s / s.norm()
    s[(rel - 2e-4).abs().argmin()] = 2e-4 * s.norm()  # one singular value at exactly 2e-4·‖g‖_F (to 1e-8)
    rel = s / s.norm()
    o = orthogonalize(((u * s) @ v.T).float(), svd_max=64).double()
    err = (torch.einsum("im,ij,jm->m", u, o, v) - 1).abs()
    assert err[rel >= 4e-4].max() < 1e-6
    assert err[rel >= 2.2e-4].max() < 1e-3
    assert err[(rel - 2e-4).abs().argmin()] == pytest.approx(2.4e-3, rel=0.05)
    assert err[(rel - 1.5e-4).abs().argmin()] == pytest.approx(0.02, rel=0.15)
    assert err[(rel - 1e-4).abs().argmin()] == pytest.approx(0.12, rel=0.1)
