"""LoRA-Pro's closed form (arXiv 2407.18242, Wang & Liang 2024), as pure functions on one LoRA pair.

Convention (PEFT's): ``W = W0 + s B A`` with ``B`` (out x r), ``A`` (r x in) and
``g_A = s B^T G``, ``g_B = s G A^T`` for ``G = dL/dW``. LoRA's plain step moves ``W`` by
``s (B g_A + g_B A) = s^2 (B B^T G + G A^T A)`` to first order, which can be far from ``G``. LoRA-Pro
replaces ``(g_A, g_B)`` by ``(ĝ_A, ĝ_B)`` whose equivalent update ``s (B ĝ_A + ĝ_B A)`` is the
closest, in Frobenius norm, to ``G`` among all updates LoRA can make:

    ĝ_A = (1/s^2) (B^T B)^-1 g_A + X A
    ĝ_B = (1/s^2) (I - P_B) g_B (A A^T)^-1 - B X,        P_B = B (B^T B)^-1 B^T

and then ``s (B ĝ_A + ĝ_B A) = P_B G + (I - P_B) G P_A`` (``P_A = A^T (A A^T)^-1 A``) for any r x r X.
All r x r algebra runs in at least fp32 through :mod:`gradkit.optim.linalg`; inverses are damped
pseudo-inverses (relative damping), so rank-deficient factors give finite updates.
"""

from __future__ import annotations

import torch

from gradkit.errors import GradkitError
from gradkit.optim.linalg import (
    DEFAULT_DAMPING,
    SymEig,
    compute_dtype,
    eig_inverse,
    sylvester_from_eig,
    sym_eig,
)

X_SOLUTIONS = ("sylvester", "symmetric", "zero")


def gram_eigs(A: torch.Tensor, B: torch.Tensor) -> tuple[SymEig, SymEig]:
    """Eigendecompositions of ``B^T B`` and ``A A^T`` (both r x r), in at least fp32."""
    cd = compute_dtype(A.dtype)
    A, B = A.to(cd), B.to(cd)
    return sym_eig(B.mT @ B), sym_eig(A @ A.mT)


def adjusted_lora_grads(
    A: torch.Tensor,
    B: torch.Tensor,
    g_A: torch.Tensor,
    g_B: torch.Tensor,
    s: float | torch.Tensor,
    x_solution: str = "sylvester",
    damping: float = DEFAULT_DAMPING,
    *,
    eigs: tuple[SymEig, SymEig] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted factor gradients ``(ĝ_A, ĝ_B)`` (arXiv 2407.18242, Theorems 2.1-2.2).

    ``ĝ_A = (1/s^2)(B^T B)^-1 g_A + X A`` and ``ĝ_B = (1/s^2)(I - P_B) g_B (A A^T)^-1 - B X``; the
    equivalent full update ``s (B ĝ_A + ĝ_B A)`` equals ``P_B G + (I - P_B) G P_A`` whatever X is.
    ``x_solution`` picks the free r x r matrix X:

    - ``"sylvester"`` (the paper's): the X that keeps ``(ĝ_A, ĝ_B)`` closest to ``(g_A, g_B)``,
      solving ``(B^T B) X + X (A A^T) = -(1/s^2)(B^T B)^-1 g_A A^T``;
    - ``"symmetric"``: ``X = -(1/(2 s^2)) (B^T B)^-1 g_A A^T (A A^T)^-1``, which splits the doubly
      projected part ``P_B G P_A`` evenly between the two factors;
    - ``"zero"``: X = 0 (all of ``P_B G`` goes to A).

    ``B = 0`` (the first step of a default LoRA) is handled explicitly: ``ĝ_A = g_A`` (which is 0)
    and ``ĝ_B = (1/s^2) g_B (A A^T)^-1``. Any dtype in; the result is in at least fp32.
    ``eigs`` reuses precomputed :func:`gram_eigs`.
    """
    if x_solution not in X_SOLUTIONS:
        raise GradkitError(f"unknown x_solution {x_solution!r}; use one of {', '.join(X_SOLUTIONS)}")
    cd = compute_dtype(A.dtype)
    A, B, g_A, g_B = A.to(cd), B.to(cd), g_A.to(cd), g_B.to(cd)
    eig_B, eig_A = eigs if eigs is not None else gram_eigs(A, B)
    inv_B, inv_A = eig_inverse(eig_B, damping), eig_inverse(eig_A, damping)
    c = 1.0 / (s * s)
    hat_A = c * (inv_B @ g_A)
    hat_B = c * ((g_B - B @ (inv_B @ (B.mT @ g_B))) @ inv_A)
    if x_solution != "zero":
        rhs = -(hat_A @ A.mT)  # -(1/s^2) (B^T B)^-1 g_A A^T
        if x_solution == "sylvester":
            X = sylvester_from_eig(eig_B, eig_A, rhs, damping)
        else:
            X = 0.5 * (rhs @ inv_A)
        hat_A = hat_A + X @ A
        hat_B = hat_B - B @ X
    b_zero = (eig_B.values[..., -1] == 0)[..., None, None]  # per matrix of a batch
    hat_A = torch.where(b_zero, g_A, hat_A)
    hat_B = torch.where(b_zero, c * (g_B @ inv_A), hat_B)
    return hat_A, hat_B


def equivalent_gradient(
    A: torch.Tensor,
    B: torch.Tensor,
    g_A: torch.Tensor,
    g_B: torch.Tensor,
    s: float | torch.Tensor,
    damping: float = DEFAULT_DAMPING,
    *,
    eigs: tuple[SymEig, SymEig] | None = None,
) -> torch.Tensor:
    """The full-size (out x in) equivalent gradient ``P_B G + (I - P_B) G P_A`` of LoRA-Pro, computed
    from the factor gradients alone (``G`` itself is never needed):
    ``(1/s) B (B^T B)^-1 g_A + (1/s) (I - P_B) g_B (A A^T)^-1 A``. It is the projection of ``G`` onto
    the tangent space of rank-r matrices at ``B A``: the best update LoRA can make.
    """
    cd = compute_dtype(A.dtype)
    A, B, g_A, g_B = A.to(cd), B.to(cd), g_A.to(cd), g_B.to(cd)
    eig_B, eig_A = eigs if eigs is not None else gram_eigs(A, B)
    inv_B, inv_A = eig_inverse(eig_B, damping), eig_inverse(eig_A, damping)
    proj_gB = g_B - B @ (inv_B @ (B.mT @ g_B))
    return (B @ (inv_B @ g_A) + proj_gB @ (inv_A @ A)) / s


def lora_equivalent_update(
    A: torch.Tensor, B: torch.Tensor, d_A: torch.Tensor, d_B: torch.Tensor, s: float | torch.Tensor
) -> torch.Tensor:
    """First-order change of ``W = W0 + s B A`` when the factors move by ``(d_A, d_B)``:
    ``s (B d_A + d_B A)`` (out x in)."""
    cd = compute_dtype(A.dtype)
    return s * (B.to(cd) @ d_A.to(cd) + d_B.to(cd) @ A.to(cd))


def tangent_projection(
    A: torch.Tensor, B: torch.Tensor, M: torch.Tensor, damping: float = DEFAULT_DAMPING
) -> torch.Tensor:
    """``P_B M + (I - P_B) M P_A``: the closest update LoRA can make to a full-size matrix ``M``."""
    cd = compute_dtype(A.dtype)
    A, B, M = A.to(cd), B.to(cd), M.to(cd)
    eig_B, eig_A = gram_eigs(A, B)
    inv_B, inv_A = eig_inverse(eig_B, damping), eig_inverse(eig_A, damping)
    PBM = B @ (inv_B @ (B.mT @ M))
    return PBM + ((M - PBM) @ A.mT) @ (inv_A @ A)
