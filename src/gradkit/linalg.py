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

import os
import platform
from typing import NamedTuple

import torch

# exact LAPACK SVD up to this min(out, in); randomized subspace iteration above. Measured in fp32 on one
# CPU thread for rank 16: 384 x 384 takes 14 ms exact against 3.7 ms randomized, 384 x 1536 54 against 12 ms,
# 1024 x 4096 580 against 84 ms; on MiniLM's SST-2 gradients the randomized rank-16 error is within 1e-7
# of the optimal one (6 power steps, 2 * rank + 8 columns)
EXACT_SVD_MAX_DIM = 128


# how :func:`truncated_svd` (LoRA-GA's init) runs: recorded in every run's summary.json
FACTORISATION_MODE = "float64, canonical signs"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name", else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def numerics() -> dict[str, str]:
    """What decides a CPU run's bits besides the thread count: the CPU model, the instruction set ATen's
    kernels use (``torch.backends.cpu.get_cpu_capability()``, lowered by ``ATEN_CPU_CAPABILITY``), MKL's
    code path (``MKL_CBWR``; "unset" lets MKL pick by CPU) and how LoRA-GA's factorisations run."""
    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "unset"),
        "factorisation_mode": FACTORISATION_MODE,
    }


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


def canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign of each singular pair: column ``u_i`` of U is flipped, with row ``i`` of Vh, so that
    its largest-magnitude entry is positive (the first such entry on a tie).

    An SVD defines ``(u_i, v_i)`` only up to a common sign, and LAPACK's code paths (MKL's AVX2 / AVX-512
    / compatible kernels) choose it differently; ``u_i v_i^T`` is unchanged by the flip, but a caller
    that uses ``u_i`` and ``v_j`` apart (LoRA-GA's split) would otherwise get a different matrix.
    """
    index = U.abs().argmax(dim=0, keepdim=True)
    sign = torch.where(U.gather(0, index) < 0, -1.0, 1.0).to(U.dtype)
    return U * sign, Vh * sign.mT


def truncated_svd(G: torch.Tensor, rank: int, *, niter: int = 6, seed: int = 0):
    """Top-``rank`` singular triplets (U, S, Vh) of G, computed in float64 and returned in fp32 with
    :func:`canonical_signs`.

    Exact (LAPACK) when min(G.shape) <= EXACT_SVD_MAX_DIM; otherwise randomized subspace iteration
    (Halko, Martinsson & Tropp 2011, Alg. 4.4) with 2*rank + 8 columns and ``niter`` re-orthonormalised
    power steps, from a private generator (the global RNG is untouched).

    Why float64 and fixed signs: LAPACK's signs of singular vectors differ between MKL's code paths
    (``MKL_CBWR``, and so between CPUs), and LoRA-GA uses ``u_i`` and ``v_j`` apart, so a flipped sign
    is another init; in fp32, MKL's SVD/QR and ATen's Gaussian sampler also give other bits per code path
    and ``ATEN_CPU_CAPABILITY``. In float64 the paths differ by about 1e-16 relative, which the rounding
    to fp32 removes except for an entry that close to an fp32 rounding boundary (measured: at most 2 of
    331,776 entries of MiniLM's init, by one ulp, on the randomized path; none on the exact one). The test matrix
    is drawn in float64, whose sampler is the same scalar code under every capability.
    """
    G = G.double()
    m, n = G.shape
    if min(m, n) <= EXACT_SVD_MAX_DIM or 2 * rank + 8 >= min(m, n):
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        generator = torch.Generator(device=G.device).manual_seed(seed)
        omega = torch.randn(n, 2 * rank + 8, generator=generator, device=G.device, dtype=torch.float64)
        Q, _ = torch.linalg.qr(G @ omega)
        for _ in range(niter):
            # (Q^T G)^T, not G^T Q: MKL's float64 product with a transposed G runs about 7x slower here
            Q, _ = torch.linalg.qr((Q.T @ G).T)
            Q, _ = torch.linalg.qr(G @ Q)
        Ub, S, Vh = torch.linalg.svd(Q.T @ G, full_matrices=False)
        U, S, Vh = (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]
    U, Vh = canonical_signs(U, Vh)
    return U.float(), S.float(), Vh.float()
