"""Small dense kernels: rank-revealing SVDs of LoRA factors and the symmetric Sylvester solver."""

from __future__ import annotations

import pytest
import torch

from gradkit.linalg import default_rtol, factor_svd, solve_sylvester_sym


def _gram(rows: int, r: int, dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    F = torch.randn(rows, r, generator=gen, dtype=dtype)
    return F, F.mT @ F


def test_factor_svd_is_an_orthonormal_basis_and_reconstructs():
    F, _ = _gram(50, 6)
    svd = factor_svd(F)
    assert bool(svd.keep.all()) and int(svd.rank) == 6
    torch.testing.assert_close(svd.U.mT @ svd.U, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close((svd.U * svd.S) @ svd.V.mT, F, rtol=0, atol=1e-12)
    torch.testing.assert_close(svd.U_kept @ svd.U_kept.mT, F @ torch.linalg.pinv(F), rtol=0, atol=1e-12)
    torch.testing.assert_close(svd.V @ torch.diag(svd.inv**2) @ svd.V.mT, torch.linalg.inv(F.mT @ F))


def test_factor_svd_rank_tolerance_is_dtype_aware():
    U, _ = torch.linalg.qr(
        torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    )
    F = U * torch.tensor([1.0, 1e-4, 1e-9], dtype=torch.float64)
    assert factor_svd(F).keep.tolist() == [True, True, True]  # fp64: 40 * 2.2e-16 * 1 < 1e-9
    assert factor_svd(F.float()).keep.tolist() == [True, True, False]  # fp32: 40 * 1.2e-7 > 1e-9
    assert factor_svd(F.bfloat16()).S.dtype == torch.float32  # half types run in fp32
    assert factor_svd(F, rtol=1e-3).keep.tolist() == [True, False, False]
    assert default_rtol(40, 3, torch.bfloat16) == 40 * torch.finfo(torch.float32).eps


def test_factor_svd_zero_tiny_and_rank_deficient_factors():
    zero = factor_svd(torch.zeros(8, 3))
    assert (
        int(zero.rank) == 0
        and torch.equal(zero.inv, torch.zeros(3))
        and torch.equal(zero.U_kept, torch.zeros(8, 3))
    )
    gen = torch.Generator().manual_seed(2)
    tiny = factor_svd(1e-20 * torch.randn(8, 3, generator=gen))  # sigma^2 would be subnormal in fp32
    assert int(tiny.rank) == 0 and torch.isfinite(tiny.inv).all()
    F = torch.randn(8, 3, generator=gen)
    F[:, 0] *= 1e-20
    part = factor_svd(F)
    assert int(part.rank) == 2 and torch.isfinite(part.inv).all()
    F = torch.randn(40, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 5, generator=gen, dtype=torch.float64
    )
    low = factor_svd(F)  # rank 2 of 5
    assert int(low.rank) == 2
    torch.testing.assert_close(low.U_kept @ low.U_kept.mT, F @ torch.linalg.pinv(F), rtol=0, atol=1e-10)
    batched = factor_svd(torch.stack([F, torch.zeros_like(F)]))
    assert batched.rank.tolist() == [2, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sylvester_residual_is_small(dtype):
    _, M = _gram(64, 8, dtype=dtype, seed=2)
    _, N = _gram(48, 8, dtype=dtype, seed=3)
    C = torch.randn(8, 8, dtype=dtype, generator=torch.Generator().manual_seed(4))
    X = solve_sylvester_sym(M, N, C)
    residual = (M @ X + X @ N - C).norm() / C.norm()
    assert residual <= 1e-5
    if dtype == torch.float64:
        X = solve_sylvester_sym(M, N, C, rtol=0.0)
        assert (M @ X + X @ N - C).norm() / C.norm() <= 1e-12


def test_sylvester_matches_kronecker_reference_for_rectangular_blocks():
    _, M = _gram(20, 3, seed=5)
    _, N = _gram(20, 5, seed=6)
    C = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    X = solve_sylvester_sym(M, N, C, rtol=0.0)
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
