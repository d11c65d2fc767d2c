"""Small dense kernels: the truncated SVD of a gradient (LoRA-GA, arXiv 2407.05000), rank-revealing
orthonormal bases of a LoRA factor's column space (thin SVD) and a symmetric Sylvester solver (LoRA-Pro,
arXiv 2407.18242). Pure tensor functions over torch only, so every package (lora/, optim/) can use them.

Everything runs in at least fp32 (bf16/fp16 inputs are promoted; fp64 stays fp64): the factors are
thin (m x r with r the LoRA rank), so an SVD costs O(m r^2), and half precision is not enough for it.

Why an SVD of the factor and not an eigendecomposition of its Gram matrix ``F^T F``: the Gram matrix
squares the condition number, so in fp32 every direction of F with ``sigma_i / sigma_max`` below
about 3e-4 is lost in it, and a tiny factor (``F ~ 1e-20`` in fp32) has a subnormal Gram matrix whose
inverse overflows. The thin SVD ``F = U diag(sigma) V^T`` keeps each direction to ``eps * sigma_max``
(backward stable), and the pseudo-inverses LoRA-Pro needs are diagonal scalings in that basis:

    P_F = U_k U_k^T,   (F^T F)^+ = V diag(1/sigma^2)_k V^T,   F (F^T F)^+ = (F^+)^T = U diag(1/sigma)_k V^T

where ``k`` counts the directions kept. Rank tolerance: a direction is kept when

    sigma_i > max(rtol * sigma_max, sqrt(tiny)),   rtol = max(m, r) * eps   (by default)

with ``eps`` and ``tiny`` (the smallest normal number) of the compute dtype: the first bound is the
usual numerical-rank rule (LAPACK / NumPy's ``matrix_rank``), the second drops directions whose
``sigma^2`` would be subnormal (in fp32, ``sigma < 1.1e-19``), so a factor that is tiny but not zero
counts as rank-deficient (all of it tiny: rank 0, as if it were zero) and nothing overflows.
Above the tolerance every result is exact up to the rounding of the compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# exact LAPACK SVD up to this min(out, in); randomized subspace iteration above. Measured on one CPU
# thread for rank 16: 384 x 384 takes 14 ms exact against 3.7 ms randomized, 384 x 1536 54 against 12 ms,
# 1024 x 4096 580 against 84 ms; on MiniLM's SST-2 gradients the randomized rank-16 error is within 1e-7
# of the optimal one (6 power steps, 2 * rank + 8 columns)
EXACT_SVD_MAX_DIM = 128


class FactorSVD(NamedTuple):
    """Thin SVD ``F = U diag(S) V^T`` of an m x r factor (leading batch dimensions allowed), singular
    values descending, with ``keep`` marking the directions above the rank tolerance (the first
    ``rank`` ones). ``U`` has orthonormal columns and ``V`` is r x r orthogonal, kept or not."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    keep: torch.Tensor

    @property
    def inv(self) -> torch.Tensor:
        """``1/S`` on the kept directions, 0 on the others (the singular values of ``F^+``)."""
        return torch.where(self.keep, 1.0 / torch.where(self.keep, self.S, 1.0), 0.0)

    @property
    def S_kept(self) -> torch.Tensor:
        """``S`` with the dropped directions set to 0."""
        return torch.where(self.keep, self.S, 0.0)

    @property
    def U_kept(self) -> torch.Tensor:
        """``U`` with the dropped columns set to 0: an orthonormal basis of the numerical column space
        (padded with zero columns), so ``U_kept U_kept^T`` is the projector onto it."""
        return self.U * self.keep.unsqueeze(-2).to(self.U.dtype)

    @property
    def rank(self) -> torch.Tensor:
        return self.keep.sum(-1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64: the precision the factor algebra runs in."""
    return torch.promote_types(dtype, torch.float32)


def default_rtol(rows: int, cols: int, dtype: torch.dtype) -> float:
    """``max(rows, cols) * eps`` of the compute dtype: the relative rank tolerance of an SVD."""
    return max(rows, cols) * torch.finfo(compute_dtype(dtype)).eps


def factor_svd(F: torch.Tensor, rtol: float | None = None) -> FactorSVD:
    """Rank-revealing thin SVD of a tall factor F (m x r, or a batch of them), in at least fp32.

    ``F = U diag(S) V^T`` via ``torch.linalg.svd``; direction i is kept when
    ``S_i > max(rtol * S_max, sqrt(tiny))`` (``rtol`` defaults to :func:`default_rtol`; ``tiny`` is the
    compute dtype's smallest normal number). A zero or tiny factor has rank 0. Used by LoRA-Pro
    (arXiv 2407.18242) for ``P_B``, ``P_A``, ``(B^T B)^+`` and ``(A A^T)^+`` (with ``F = B`` and
    ``F = A^T``).

    A wide factor (m < r: a LoRA rank above the layer's width, e.g. on a 2-class output layer) is
    padded to the same shapes as a tall one: ``U`` gets ``r - m`` zero columns, ``S`` zeros (never
    kept) and ``V`` is a full r x r orthogonal matrix, so callers see ``U``: m x r, ``S``: r, ``V``: r x r.
    """
    cd = compute_dtype(F.dtype)
    F = F.to(cd)
    if rtol is None:
        rtol = default_rtol(F.shape[-2], F.shape[-1], cd)
    m, r = F.shape[-2], F.shape[-1]
    U, S, Vh = torch.linalg.svd(F, full_matrices=m < r)
    if m < r:
        U = torch.cat([U, U.new_zeros(*U.shape[:-1], r - m)], dim=-1)
        S = torch.cat([S, S.new_zeros(*S.shape[:-1], r - m)], dim=-1)
    floor = torch.finfo(cd).tiny ** 0.5
    cut = (rtol * S[..., :1]).clamp_min(floor)
    keep = torch.gt(S, cut)
    return FactorSVD(U, S, Vh.mT, keep)


def sylvester_diag(
    P: torch.Tensor, l: torch.Tensor, Q: torch.Tensor, m: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Solve ``M X + X N = C`` given ``M = P diag(l) P^T`` and ``N = Q diag(m) Q^T`` (l, m >= 0).

    In the eigenbases the equation is diagonal: ``(l_i + m_j) Y_ij = (P^T C Q)_ij`` with
    ``X = P Y Q^T``. Where ``l_i + m_j = 0`` (both matrices singular in those directions) ``Y_ij = 0``:
    the minimum-norm (pseudo-inverse) solution. No damping: pass eigenvalues already cut at a rank
    tolerance (set to exactly 0).
    """
    denom = l.unsqueeze(-1) + m.unsqueeze(-2)
    nonzero = denom > 0
    Y = (P.mT @ C.to(P.dtype) @ Q) / torch.where(nonzero, denom, 1.0)
    return P @ torch.where(nonzero, Y, 0.0) @ Q.mT


def solve_sylvester_sym(
    M: torch.Tensor, N: torch.Tensor, C: torch.Tensor, rtol: float | None = None
) -> torch.Tensor:
    """Solve the Sylvester equation ``M X + X N = C`` for symmetric PSD ``M`` (p x p) and ``N`` (q x q).

    Two symmetric eigendecompositions ``M = P diag(l) P^T``, ``N = Q diag(m) Q^T`` give
    ``X = P [(P^T C Q)_ij / (l_i + m_j)] Q^T`` (the unique solution when all ``l_i + m_j > 0``).
    Eigenvalues at most ``rtol * max(l_max, m_max)`` (default ``max(p, q) * eps``) count as 0, and
    entries with ``l_i + m_j = 0`` are 0 (the pseudo-inverse solution). This is the equation LoRA-Pro
    (arXiv 2407.18242) solves for its free r x r matrix X, with ``M = B^T B`` and ``N = A A^T``
    (:mod:`gradkit.optim.lora_pro_math` solves it from the factors' SVDs instead, without forming the
    Gram matrices). Runs in at least fp32; returns that dtype.
    """
    cd = compute_dtype(M.dtype)
    M, N = M.to(cd), N.to(cd)
    l, P = torch.linalg.eigh((M + M.mT) / 2)
    m, Q = torch.linalg.eigh((N + N.mT) / 2)
    if rtol is None:
        rtol = max(M.shape[-1], N.shape[-1]) * torch.finfo(cd).eps
    top = torch.maximum(l[..., -1:], m[..., -1:])
    cut = (rtol * top).clamp_min(torch.finfo(cd).tiny)
    l = torch.where(l > cut, l, 0.0)
    m = torch.where(m > cut, m, 0.0)
    return sylvester_diag(P, l, Q, m, C)


def truncated_svd(G: torch.Tensor, rank: int, *, niter: int = 6, seed: int = 0):
    """Top-``rank`` singular triplets (U, S, Vh) of G in fp32.

    Exact (LAPACK) when min(G.shape) <= EXACT_SVD_MAX_DIM; otherwise randomized subspace iteration
    (Halko, Martinsson & Tropp 2011, Alg. 4.4) with 2*rank + 8 columns and ``niter`` re-orthonormalised
    power steps, from a private generator (the global RNG is untouched).
    """
    G = G.float()
    m, n = G.shape
    if min(m, n) <= EXACT_SVD_MAX_DIM or 2 * rank + 8 >= min(m, n):
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    generator = torch.Generator(device=G.device).manual_seed(seed)
    omega = torch.randn(n, 2 * rank + 8, generator=generator, device=G.device)
    Q, _ = torch.linalg.qr(G @ omega)
    for _ in range(niter):
        Q, _ = torch.linalg.qr(G.T @ Q)
        Q, _ = torch.linalg.qr(G @ Q)
    Ub, S, Vh = torch.linalg.svd(Q.T @ G, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]
