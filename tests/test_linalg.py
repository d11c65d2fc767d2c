"""Small dense kernels: damped inverses of Gram matrices and the symmetric Sylvester solver."""

from __future__ import annotations

import pytest
import torch

from gradkit.optim.linalg import (
    damped_inverse,
    eig_inverse_sqrt,
    solve_sylvester_sym,
    sym_eig,
)


def _gram(rows: int, r: int, dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    F = torch.randn(rows, r, generator=gen, dtype=dtype)
    return F, F.mT @ F


def test_damped_inverse_matches_inverse_when_well_conditioned():
    _, M = _gram(50, 6)
    inv = damped_inverse(M, damping=1e-14)
    torch.testing.assert_close(inv, torch.linalg.inv(M), rtol=1e-9, atol=1e-12)
    # the default relative damping moves a well-conditioned inverse by about damping * cond(M)
    default = damped_inverse(M)
    assert (default - inv).norm() / inv.norm() < 1e-4


def test_damped_inverse_of_zero_is_zero_and_half_types_run_in_fp32():
    assert torch.equal(damped_inverse(torch.zeros(4, 4)), torch.zeros(4, 4))
    _, M = _gram(30, 4, dtype=torch.float32)
    out = damped_inverse(M.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.linalg.inv(M.bfloat16().float()), rtol=1e-3, atol=1e-5)


def test_damped_inverse_of_rank_deficient_gram_is_bounded_pseudo_inverse():
    gen = torch.Generator().manual_seed(1)
    F = torch.randn(40, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 5, generator=gen, dtype=torch.float64
    )
    M = F.mT @ F  # rank 2 of 5
    inv = damped_inverse(M)
    assert torch.isfinite(inv).all()
    proj = F @ inv @ F.mT  # eigenvalues l/(l+delta): a projector onto col(F) up to the damping
    eigs = torch.linalg.eigvalsh(proj)
    assert eigs.min() > -1e-9 and eigs.max() < 1.0
    torch.testing.assert_close(proj, F @ torch.linalg.pinv(M) @ F.mT, rtol=0, atol=1e-5)


def test_inverse_sqrt_gives_orthonormal_polar_factor():
    F, M = _gram(30, 5)
    U = F @ eig_inverse_sqrt(sym_eig(M), damping=1e-14)
    torch.testing.assert_close(U.mT @ U, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
    # polar factor: the orthonormal matrix closest to F, and U^T F is symmetric positive definite
    S = U.mT @ F
    torch.testing.assert_close(S, S.mT, rtol=0, atol=1e-10)
    assert torch.linalg.eigvalsh(S).min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sylvester_residual_is_small(dtype):
    _, M = _gram(64, 8, dtype=dtype, seed=2)
    _, N = _gram(48, 8, dtype=dtype, seed=3)
    C = torch.randn(8, 8, dtype=dtype, generator=torch.Generator().manual_seed(4))
    X = solve_sylvester_sym(M, N, C)
    residual = (M @ X + X @ N - C).norm() / C.norm()
    assert residual <= 1e-5
    if dtype == torch.float64:
        X = solve_sylvester_sym(M, N, C, damping=0.0)
        assert (M @ X + X @ N - C).norm() / C.norm() <= 1e-12


def test_sylvester_matches_kronecker_reference_for_rectangular_blocks():
    _, M = _gram(20, 3, seed=5)
    _, N = _gram(20, 5, seed=6)
    C = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    X = solve_sylvester_sym(M, N, C, damping=0.0)
    # vec(M X + X N) = (I (x) M + N^T (x) I) vec(X) with column-major vec
    K = torch.kron(torch.eye(5, dtype=torch.float64), M) + torch.kron(
        N.mT.contiguous(), torch.eye(3, dtype=torch.float64)
    )
    ref = torch.linalg.solve(K, C.mT.contiguous().reshape(-1)).reshape(5, 3).mT
    torch.testing.assert_close(X, ref, rtol=1e-10, atol=1e-12)


def test_sylvester_batched_and_singular_inputs_are_finite():
    _, M = _gram(30, 4, seed=8)
    _, N = _gram(30, 4, seed=9)
    C = torch.randn(2, 4, 4, dtype=torch.float64)
    Ms, Ns = torch.stack([M, M]), torch.stack([N, N])
    X = solve_sylvester_sym(Ms, Ns, C)
    torch.testing.assert_close(X[1], solve_sylvester_sym(M, N, C[1]))
    # both matrices zero: no information, X = 0 rather than a division by zero
    zero = torch.zeros(4, 4, dtype=torch.float64)
    assert torch.equal(solve_sylvester_sym(zero, zero, C[0]), zero)
    # both singular in a shared direction: finite
    F = torch.randn(10, 4, dtype=torch.float64)
    F[:, 0] = 0
    S = F.mT @ F
    assert torch.isfinite(solve_sylvester_sym(S, S, C[0])).all()
