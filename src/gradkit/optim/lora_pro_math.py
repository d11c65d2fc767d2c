"""LoRA-Pro's closed form (arXiv 2407.18242, Wang & Liang 2024), as pure functions on one LoRA pair.

Convention (PEFT's): ``W = W0 + s B A`` with ``B`` (out x r), ``A`` (r x in) and
``g_A = s B^T G``, ``g_B = s G A^T`` for ``G = dL/dW``. LoRA's plain step moves ``W`` by
``s (B g_A + g_B A) = s^2 (B B^T G + G A^T A)`` to first order, which can be far from ``G``. LoRA-Pro
replaces ``(g_A, g_B)`` by ``(ĝ_A, ĝ_B)`` whose equivalent update ``s (B ĝ_A + ĝ_B A)`` is the
closest, in Frobenius norm, to ``G`` among all updates LoRA can make:

    ĝ_A = (1/s^2) (B^T B)^+ g_A + X A
    ĝ_B = (1/s^2) (I - P_B) g_B (A A^T)^+ - B X,        P_B = B (B^T B)^+ B^T

and then ``s (B ĝ_A + ĝ_B A) = P_B G + (I - P_B) G P_A`` (``P_A = A^T (A A^T)^+ A``) for any r x r X.

Numerics. Nothing here forms or inverts a Gram matrix: every pseudo-inverse and projector comes from
the rank-revealing thin SVDs ``B = U_B diag(σ) V_B^T`` and ``A^T = Z diag(τ) W^T``
(:func:`gradkit.linalg.factor_svd`, at least fp32), in which they are diagonal scalings
(``(B^T B)^+ = V_B diag(1/σ^2) V_B^T``, ``P_B = U_B U_B^T`` over the kept directions, ...). A direction
is kept when its singular value exceeds ``max(rtol * σ_max, sqrt(tiny))`` with ``rtol = max(m, r) * eps``
of the compute dtype by default. Above that tolerance the results are exact up to rounding (relative
error about ``eps * cond(factor)``, the conditioning of the problem itself); below it a direction is
treated as absent, so rank-deficient, zero and tiny-but-non-zero factors all give finite updates (a
factor that is tiny everywhere has rank 0: a tiny B takes the ``B = 0`` branch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gradkit.errors import GradkitError
from gradkit.linalg import FactorSVD, compute_dtype, factor_svd, sylvester_diag

X_SOLUTIONS = ("sylvester", "symmetric", "zero")


def factor_svds(A: torch.Tensor, B: torch.Tensor, rtol: float | None = None) -> tuple[FactorSVD, FactorSVD]:
    """Rank-revealing thin SVDs of ``B`` (out x r) and ``A^T`` (in x r), in at least fp32
    (see :func:`gradkit.linalg.factor_svd`)."""
    return factor_svd(B, rtol), factor_svd(A.mT, rtol)


def _rows(scale: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return scale.unsqueeze(-1) * M


def _cols(M: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return M * scale.unsqueeze(-2)


def _pieces(A, B, tensors, rtol, svds):
    cd = compute_dtype(A.dtype)
    A, B = A.to(cd), B.to(cd)
    tensors = [t.to(cd) for t in tensors]
    svd_B, svd_A = svds if svds is not None else factor_svds(A, B, rtol)
    return A, B, tensors, svd_B, svd_A


def adjusted_lora_grads(
    A: torch.Tensor,
    B: torch.Tensor,
    g_A: torch.Tensor,
    g_B: torch.Tensor,
    s: float | torch.Tensor,
    x_solution: str = "sylvester",
    rtol: float | None = None,
    *,
    svds: tuple[FactorSVD, FactorSVD] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted factor gradients ``(ĝ_A, ĝ_B)`` (arXiv 2407.18242, Theorems 2.1-2.2).

    ``ĝ_A = (1/s^2)(B^T B)^+ g_A + X A`` and ``ĝ_B = (1/s^2)(I - P_B) g_B (A A^T)^+ - B X``; the
    equivalent full update ``s (B ĝ_A + ĝ_B A)`` equals ``P_B G + (I - P_B) G P_A`` whatever X is.
    ``x_solution`` picks the free r x r matrix X:

    - ``"sylvester"`` (the paper's): the X that keeps ``(ĝ_A, ĝ_B)`` closest to ``(g_A, g_B)``,
      solving ``(B^T B) X + X (A A^T) = -(1/s^2)(B^T B)^+ g_A A^T``;
    - ``"symmetric"``: ``X = -(1/(2 s^2)) (B^T B)^+ g_A A^T (A A^T)^+``, which splits the doubly
      projected part ``P_B G P_A`` evenly between the two factors;
    - ``"zero"``: X = 0 (all of ``P_B G`` goes to A).

    ``"zero"`` and ``"symmetric"`` are covariant under a refactoring ``(B, A) -> (BQ, Q^-1 A)``
    (``ĝ_A -> Q^-1 ĝ_A``, ``ĝ_B -> ĝ_B Q``); the Sylvester X, chosen in the factors' own Euclidean
    metric, is not (only the equivalent update is invariant). ``B = 0`` (the first step of a default
    LoRA, or a B below the rank tolerance everywhere) is handled explicitly: ``ĝ_A = g_A`` and
    ``ĝ_B = (1/s^2) g_B (A A^T)^+``. Pseudo-inverses come from rank-revealing SVDs of the factors (see
    the module docstring). Any dtype in; the result is in at least fp32. ``svds`` reuses
    precomputed :func:`factor_svds`.
    """
    if x_solution not in X_SOLUTIONS:
        raise GradkitError(f"unknown x_solution {x_solution!r}; use one of {', '.join(X_SOLUTIONS)}")
    A, B, (g_A, g_B), svd_B, svd_A = _pieces(A, B, (g_A, g_B), rtol, svds)
    iB, iA = svd_B.inv, svd_A.inv
    c = 1.0 / (s * s)
    VB, WA = svd_B.V, svd_A.V
    hat_A = c * (VB @ _rows(iB, _rows(iB, VB.mT @ g_A)))  # (1/s^2) (B^T B)^+ g_A
    UB = svd_B.U_kept
    h = g_B - UB @ (UB.mT @ g_B)  # (I - P_B) g_B

    def gram_inv_A(M: torch.Tensor) -> torch.Tensor:  # M (A A^T)^+
        return _cols(_cols(M @ WA, iA), iA) @ WA.mT

    hat_B = c * gram_inv_A(h)
    if x_solution != "zero":
        rhs = -(hat_A @ A.mT)  # -(1/s^2) (B^T B)^+ g_A A^T
        if x_solution == "sylvester":
            sB, sA = svd_B.S_kept, svd_A.S_kept
            X = sylvester_diag(VB, sB * sB, WA, sA * sA, rhs)
        else:
            X = 0.5 * gram_inv_A(rhs)
        hat_A = hat_A + X @ A
        hat_B = hat_B - B @ X
    b_zero = (svd_B.rank == 0)[..., None, None]  # per matrix of a batch
    hat_A = torch.where(b_zero, g_A, hat_A)
    hat_B = torch.where(b_zero, c * gram_inv_A(g_B), hat_B)
    return hat_A, hat_B


def equivalent_gradient(
    A: torch.Tensor,
    B: torch.Tensor,
    g_A: torch.Tensor,
    g_B: torch.Tensor,
    s: float | torch.Tensor,
    rtol: float | None = None,
    *,
    svds: tuple[FactorSVD, FactorSVD] | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """The full-size (out x in) equivalent gradient ``P_B G + (I - P_B) G P_A`` of LoRA-Pro, computed
    from the factor gradients alone (``G`` itself is never needed):
    ``(1/s) B (B^T B)^+ g_A + (1/s) (I - P_B) g_B (A A^T)^+ A``. It is the projection of ``G`` onto
    the tangent space of rank-r matrices at ``B A``: the best update LoRA can make. With the SVDs
    ``B = U_B diag(σ) V_B^T``, ``A^T = Z diag(τ) W^T``: ``(1/s) [U_B diag(1/σ) V_B^T g_A +
    (I - U_B U_B^T) g_B W diag(1/τ) Z^T]`` over the kept directions.

    ``rows`` (a slice of the out dimension) forms only those rows: row i needs row i of ``U_B`` and
    of ``g_B`` plus the r x r and r x in pieces, so a rank holding rows of a sharded layer computes
    exactly its block of the full result and nothing out x in.
    """
    A, B, (g_A, g_B), svd_B, svd_A = _pieces(A, B, (g_A, g_B), rtol, svds)
    UB = svd_B.U_kept
    h = g_B - UB @ (UB.mT @ g_B)
    if rows is not None:
        UB, h = UB[..., rows, :], h[..., rows, :]
    return (UB @ _rows(svd_B.inv, svd_B.V.mT @ g_A) + _cols(h @ svd_A.V, svd_A.inv) @ svd_A.U.mT) / s


def lora_equivalent_update(
    A: torch.Tensor, B: torch.Tensor, d_A: torch.Tensor, d_B: torch.Tensor, s: float | torch.Tensor
) -> torch.Tensor:
    """First-order change of ``W = W0 + s B A`` when the factors move by ``(d_A, d_B)``:
    ``s (B d_A + d_B A)`` (out x in)."""
    cd = compute_dtype(A.dtype)
    return s * (B.to(cd) @ d_A.to(cd) + d_B.to(cd) @ A.to(cd))


def tangent_projection(
    A: torch.Tensor,
    B: torch.Tensor,
    M: torch.Tensor,
    rtol: float | None = None,
    *,
    svds: tuple[FactorSVD, FactorSVD] | None = None,
) -> torch.Tensor:
    """``P_B M + (I - P_B) M P_A``: the closest update LoRA can make to a full-size matrix ``M``, with
    ``P_B = U_B U_B^T`` and ``P_A = Z Z^T`` from the rank-revealing SVDs of ``B`` and ``A^T``."""
    A, B, (M,), svd_B, svd_A = _pieces(A, B, (M,), rtol, svds)
    UB, Z = svd_B.U_kept, svd_A.U_kept
    PBM = UB @ (UB.mT @ M)
    return PBM + ((M - PBM) @ Z) @ Z.mT


class TangentBases(NamedTuple):
    """Orthonormal bases of ``col(B)`` (``U``, out x r) and ``row(A)`` (``Vt``, r x in), zero columns
    (rows) where a factor is rank-deficient, and their coordinates in the factors' SVD bases:
    ``U = U_B P`` and ``Vt^T = Z R`` (``P``, ``R`` r x r)."""

    U: torch.Tensor
    Vt: torch.Tensor
    P: torch.Tensor
    R: torch.Tensor


def _fix_signs(basis: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each column so that its largest-magnitude entry is positive (zero columns unchanged)."""
    idx = basis.abs().argmax(-2, keepdim=True)
    sign = torch.where(basis.gather(-2, idx) < 0, -1.0, 1.0).to(basis.dtype)
    return basis * sign, coords * sign


def canonical_bases(
    A: torch.Tensor,
    B: torch.Tensor,
    rtol: float | None = None,
    *,
    svds: tuple[FactorSVD, FactorSVD] | None = None,
) -> TangentBases:
    """Bases of ``col(B)`` and ``row(A)`` that depend on the product ``B A`` only, not on how it is
    factored: the left and right singular vectors of ``B A`` (singular values descending, each vector's
    largest-magnitude entry positive). A refactoring ``(B, A) -> (BQ, Q^-1 A)`` (Q invertible) leaves
    them unchanged, while a basis built from one factor alone (its polar factor, its own singular
    vectors) turns with Q. Used by LoRA-Pro's projected moments (arXiv 2407.18242 for the projection).

    Computed from the factor SVDs: ``B A = U_B M Z^T`` with the r x r core
    ``M = diag(σ) V_B^T W diag(τ)``, and ``M = P Σ R^T`` gives ``U = U_B P``, ``V = Z R``. Unique when
    ``B A`` has r distinct non-zero singular values. Where it has fewer (a factor rank-deficient, e.g.
    ``B = 0`` on a default LoRA's first step) the bases span the kept directions of each factor, the
    product's singular vectors first, then the rest in the factor's own SVD basis (which a refactoring
    can turn: no basis of ``row(A)`` is determined by ``B A = 0``); dropped directions are zero columns.
    Degenerate singular values of ``B A`` leave a rotation within their subspace undetermined.
    """
    cd = compute_dtype(A.dtype)
    svd_B, svd_A = svds if svds is not None else factor_svds(A.to(cd), B.to(cd), rtol)
    core = _cols(_rows(svd_B.S_kept, svd_B.V.mT @ svd_A.V), svd_A.S_kept)
    P, _, Rh = torch.linalg.svd(core)
    R = Rh.mT
    full = svd_B.keep.all(-1) & svd_A.keep.all(-1)
    if not bool(full.all()):  # rank-deficient members: keep each basis inside its factor's kept directions
        r = core.shape[-1]
        P, R = P.reshape(-1, r, r).clone(), R.reshape(-1, r, r).clone()
        flat_core = core.reshape(-1, r, r)
        kB, kA = svd_B.rank.reshape(-1).tolist(), svd_A.rank.reshape(-1).tolist()
        for i in (~full).reshape(-1).nonzero().flatten().tolist():
            P[i].zero_()
            R[i].zero_()
            b, a = kB[i], kA[i]
            if b and a:
                p, _, rh = torch.linalg.svd(flat_core[i, :b, :a])
                P[i, :b, :b], R[i, :a, :a] = p, rh.mT
            else:
                P[i, :b, :b] = torch.eye(b, dtype=P.dtype, device=P.device)
                R[i, :a, :a] = torch.eye(a, dtype=R.dtype, device=R.device)
        P, R = P.reshape(core.shape), R.reshape(core.shape)
    U, P = _fix_signs(svd_B.U_kept @ P, P)
    V, R = _fix_signs(svd_A.U_kept @ R, R)
    return TangentBases(U, V.mT, P, R)


def transported_bases(
    svds: tuple[FactorSVD, FactorSVD], U_old: torch.Tensor, Vt_old: torch.Tensor, start: TangentBases
) -> TangentBases:
    """The previous step's bases carried into the factors' new column and row spaces: the orthonormal
    basis of ``col(B)`` closest to ``U_old`` (orthogonal Procrustes, ``U = U_B X Y^T`` for the SVD
    ``U_B^T U_old = X Σ Y^T``) and likewise for ``row(A)``.

    Like :func:`canonical_bases` this depends only on the subspaces (and on the previous bases), not on
    how ``B A`` is factored, and it moves continuously with them: ``U^T U_old = Y Σ Y^T`` is symmetric
    positive definite (the cosines of the principal angles), close to the identity after a small step,
    whereas singular vectors of ``B A`` turn abruptly where two singular values nearly meet. Members
    whose factors or previous bases are not of full rank r (a first step, ``B = 0``) take ``start``
    (normally :func:`canonical_bases`) instead.
    """
    svd_B, svd_A = svds

    def procrustes(basis: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        X, _, Yh = torch.linalg.svd(basis.mT @ old.to(basis.dtype))
        return X @ Yh

    P, R = procrustes(svd_B.U, U_old), procrustes(svd_A.U, Vt_old.mT)
    old_full = (U_old.norm(dim=-2) > 0.5).all(-1) & (Vt_old.norm(dim=-1) > 0.5).all(-1)
    ok = (old_full & svd_B.keep.all(-1) & svd_A.keep.all(-1))[..., None, None]
    return TangentBases(
        torch.where(ok, svd_B.U @ P, start.U),
        torch.where(ok, (svd_A.U @ R).mT, start.Vt),
        torch.where(ok, P, start.P),
        torch.where(ok, R, start.R),
    )
