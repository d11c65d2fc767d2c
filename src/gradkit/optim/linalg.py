"""Small dense kernels for r x r algebra: damped inverses of Gram matrices and a symmetric Sylvester
solver, both through symmetric eigendecompositions.

Everything runs in at least fp32 (bf16/fp16 inputs are promoted; fp64 stays fp64): the matrices are
r x r with r the LoRA rank, so the cost is negligible and the precision of half types is not enough
for inverting a Gram matrix, whose condition number is the square of its factor's.

Damping. A Gram matrix ``M = F^T F`` of a rank-deficient (or zero) factor F is singular. Every
inverse here is the damped pseudo-inverse

    M^+_delta = P diag(1 / (l_i + delta)) P^T,   delta = damping * max_i l_i,

with ``M = P diag(l) P^T`` (eigenvalues clamped at 0 first: rounding can make them slightly negative)
and ``M^+_delta = 0`` when ``M = 0``. Relative damping is scale-free (the same for a LoRA factor of
norm 1e-4 as of norm 1e2) and removes only directions below ``damping`` of the strongest one, which in
fp32 are rounding noise anyway (the Gram matrix itself carries errors of about 1e-7 * l_max). Sandwiched
products stay bounded whatever the rank: ``F M^+_delta F^T`` has eigenvalues ``l/(l + delta)`` in [0, 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DEFAULT_DAMPING = 1e-6


class SymEig(NamedTuple):
    """Eigendecomposition ``M = vectors @ diag(values) @ vectors^T`` of a symmetric PSD matrix
    (values clamped at 0, ascending; leading batch dimensions allowed)."""

    values: torch.Tensor
    vectors: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64: the precision r x r algebra runs in."""
    return torch.promote_types(dtype, torch.float32)


def sym_eig(M: torch.Tensor) -> SymEig:
    """Symmetric eigendecomposition of a PSD matrix (or a batch of them) in at least fp32.

    The input is symmetrised first, ``(M + M^T) / 2``, so tiny asymmetries from a matmul do not
    leak into the result; eigenvalues below zero (rounding) are clamped to zero.
    """
    M = M.to(compute_dtype(M.dtype))
    values, vectors = torch.linalg.eigh((M + M.mT) / 2)
    return SymEig(values.clamp_min(0), vectors)


def _damped(eig: SymEig, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues + delta, mask of matrices that are not exactly zero)."""
    top = eig.values[..., -1:]
    return eig.values + damping * top, top > 0


def eig_inverse(eig: SymEig, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Damped pseudo-inverse ``P diag(1/(l + delta)) P^T`` from an eigendecomposition (0 for M = 0)."""
    shifted, nonzero = _damped(eig, damping)
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, shifted, 1.0), 0.0)
    return (eig.vectors * inv.unsqueeze(-2)) @ eig.vectors.mT


def eig_inverse_sqrt(eig: SymEig, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Damped ``M^(-1/2) = P diag(1/sqrt(l + delta)) P^T`` (0 for M = 0).

    For ``M = F^T F`` the product ``F M^(-1/2)`` is the orthonormal polar factor of F: an
    orthonormal basis of F's column space that moves continuously with F (unlike a QR basis, whose
    columns can flip sign or order when F changes a little).
    """
    shifted, nonzero = _damped(eig, damping)
    inv = torch.where(nonzero, torch.where(nonzero, shifted, 1.0).rsqrt(), 0.0)
    return (eig.vectors * inv.unsqueeze(-2)) @ eig.vectors.mT


def damped_inverse(M: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Damped pseudo-inverse of a symmetric PSD matrix (an r x r Gram matrix such as ``B^T B``).

    ``M^+ = P diag(1/(l_i + delta)) P^T`` with ``delta = damping * l_max`` and ``M^+ = 0`` for
    ``M = 0``; computed in at least fp32 through ``torch.linalg.eigh``. Used by LoRA-Pro
    (arXiv 2407.18242) for ``(B^T B)^-1`` and ``(A A^T)^-1``.
    """
    return eig_inverse(sym_eig(M), damping)


def sylvester_from_eig(
    eig_M: SymEig, eig_N: SymEig, C: torch.Tensor, damping: float = DEFAULT_DAMPING
) -> torch.Tensor:
    """Solve ``M X + X N = C`` given ``M = P diag(l) P^T`` and ``N = Q diag(m) Q^T``.

    In the eigenbases the equation is diagonal: ``(l_i + m_j) Y_ij = (P^T C Q)_ij`` with
    ``X = P Y Q^T``. The denominators are damped by ``delta = damping * (l_max + m_max)`` so that
    directions where both matrices vanish give 0 instead of a division by zero.
    """
    P, Q = eig_M.vectors, eig_N.vectors
    l, m = eig_M.values, eig_N.values
    denom = l.unsqueeze(-1) + m.unsqueeze(-2)
    scale = l[..., -1:].unsqueeze(-1) + m[..., -1:].unsqueeze(-2)
    denom = denom + damping * scale
    Y = (P.mT @ C.to(P.dtype) @ Q) / torch.where(denom > 0, denom, 1.0)
    Y = torch.where(denom > 0, Y, 0.0)
    return P @ Y @ Q.mT


def solve_sylvester_sym(
    M: torch.Tensor, N: torch.Tensor, C: torch.Tensor, damping: float = DEFAULT_DAMPING
) -> torch.Tensor:
    """Solve the Sylvester equation ``M X + X N = C`` for symmetric PSD ``M`` (p x p) and ``N`` (q x q).

    Two symmetric eigendecompositions ``M = P diag(l) P^T``, ``N = Q diag(m) Q^T`` give
    ``X = P [(P^T C Q)_ij / (l_i + m_j + delta)] Q^T`` with ``delta = damping * (l_max + m_max)``
    (the unique solution when ``l_i + m_j > 0`` for all i, j, up to the damping). This is the
    equation LoRA-Pro (arXiv 2407.18242) solves for its free r x r matrix X, with
    ``M = B^T B`` and ``N = A A^T``. Runs in at least fp32; returns that dtype.
    """
    return sylvester_from_eig(sym_eig(M), sym_eig(N), C, damping)
