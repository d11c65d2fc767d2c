"""Steepest descent under a chosen norm: normalised gradient, sign descent, orthogonalised (spectral).

For a parameter with gradient (or momentum buffer) g, the step is

    Δ = −lr · d*,   d* = argmax_{‖d‖ ≤ 1} ⟨g, d⟩,

the move of length lr (in the chosen norm) that lowers the linearised loss most; it lowers it by
lr·‖g‖_*, the dual norm (Bernstein & Newhouse 2024, "Old optimizer, new norm: an anthology",
arXiv 2409.20325). Per norm (each tensor on its own):

=============  ===========================  =====================  ===========================
``norm``       ‖d‖                          d*                     ⟨g, d*⟩ = ‖g‖_*
=============  ===========================  =====================  ===========================
``"l2"``       ‖d‖₂                         g / ‖g‖₂               ‖g‖₂ (normalised GD)
``"rms"``      ‖d‖₂ / √n                    √n · g / ‖g‖₂          √n · ‖g‖₂
``"linf"``     max |d_i|                    sign(g)                ‖g‖₁ (sign descent)
``"spectral"`` largest singular value       U Vᵀ  (g = U Σ Vᵀ)     Σ σ_i, the nuclear norm
=============  ===========================  =====================  ===========================

``"spectral"`` for a 2-D tensor is the orthogonalised update that Muon approximates (Jordan et al.
2024; ``torch.optim.Muon``). Its fall-backs, which keep the step an exact steepest step:

- 1-D tensors (biases, LayerNorm gains): viewed as an n×1 matrix, whose spectral norm is ‖·‖₂ and
  whose U Vᵀ is g/‖g‖₂ — the ``"l2"`` step.
- tensors of more than 2 dimensions (convolutions): flattened to (shape[0], −1), as Muon does.
- embeddings: the tensor alone does not say that its rows are looked up one by one, so no automatic
  rule; put embedding (and tied head) weights in their own param group with ``norm="rms"`` or
  ``"linf"`` if the spectral geometry does not suit them (``norm`` is a per-group setting).

U Vᵀ is computed exactly in float64 when min(shape) ≤ ``svd_max`` (default 256): a thin QR, x = QR
(x or xᵀ, whichever is tall), then the SVD of the small triangle R = U_R Σ Vᵀ, so U Vᵀ = Q U_R Vᵀ
(backward stable like the SVD of x, and batched: matrices of one shape in a param group go through one
``torch.linalg.qr`` and one ``torch.linalg.svd``; LoRA's factors are such thin matrices). Else by
Newton–Schulz in float32: X ← X/‖X‖_F, then
``ns_steps`` quintic steps with Jordan's coefficients (3.4445, −4.7750, 2.0315) (as torch's Muon),
then ``ns_polish`` cubic steps X ← 1.5X − 0.5XXᵀX, which converge to U Vᵀ for every singular value
that the quintic stage has raised above ~0.3 (the quintic alone leaves them anywhere in ~[0.7, 1.2],
which is what torch's Muon returns). The result is U f(Σ) Vᵀ, f being the scalar iteration applied
to σ_i/‖g‖_F. After the default 5 + 8 steps, measured (on a 300×400 float32 matrix with σ spread
log-uniformly down to 1e-4·‖g‖_F, and on the scalar map; tested): |f(σ_i) − 1| < 1e-6 for every
σ_i ≥ 4e-4·‖g‖_F, < 1e-3 for σ_i ≥ 2.2e-4·‖g‖_F, 2.4e-3 at 2e-4·‖g‖_F, 0.02 at 1.5e-4·‖g‖_F and
0.12 at 1e-4·‖g‖_F: directions with smaller σ_i (a nearly rank-deficient g) are damped towards 0,
which costs at most their share of ‖g‖_* in ⟨g, Δ⟩.

Momentum (``momentum=μ > 0``): b ← μ b + g, and the steepest step is taken on b (Nesterov:
on g + μ b); weight decay is decoupled, θ ← θ(1 − lr·λ) before the step (as AdamW and Muon).
A zero gradient gives a zero step. The l2/rms norms are accumulated in at least float32 (an fp16
gradient's ‖g‖₂ can exceed fp16's 65504).

FSDP2 (``fully_shard``: row-sharded DTensors) takes the same step as one process on the whole tensors:
the l2/rms norms are all-reduced and each spectral direction is computed from the whole matrix on one
owner rank and scattered back by rows (:mod:`gradkit.optim.steepest_sharded`).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from gradkit.errors import GradkitError
from gradkit.fsdp import is_dtensor, local
from gradkit.optim.steepest_sharded import check_layout, global_norm, spectral_directions

NORMS = ("l2", "rms", "linf", "spectral")
_NS_QUINTIC = (3.4445, -4.7750, 2.0315)


def orthogonalize_exact(x: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of each matrix of ``x`` (shape (…, m, n)), computed in float64 and returned in x.dtype.

    For a tall matrix (m ≥ n; a wide one through its transpose) the thin QR x = QR and the SVD of the
    n×n triangle R = U_R Σ Vᵀ give x = (Q U_R) Σ Vᵀ, so U Vᵀ = Q U_R Vᵀ. Singular values at or below
    σ₁·max(m, n)·ε (float64's rounding level: the values of x are exact in float64, so the cut is not
    x.dtype's, which for bf16 would cut every direction) give zero directions: ⟨x, UVᵀ⟩ = Σσ_i and
    ‖UVᵀ‖_op = 1 whenever x ≠ 0, and a zero matrix gives zero.
    """
    y = x.to(torch.float64)
    wide = y.shape[-2] < y.shape[-1]
    if wide:
        y = y.mT
    q, r = torch.linalg.qr(y)
    u, s, vh = torch.linalg.svd(r)
    cut = s[..., :1] * max(y.shape[-2:]) * torch.finfo(torch.float64).eps
    d = q @ ((u * (s > cut).to(y.dtype).unsqueeze(-2)) @ vh)
    return (d.mT if wide else d).to(x.dtype)


def orthogonalize(
    g: torch.Tensor, *, svd_max: int = 256, ns_steps: int = 5, ns_polish: int = 8
) -> torch.Tensor:
    """U Vᵀ for g = U Σ Vᵀ (a 2-D tensor): exactly (:func:`orthogonalize_exact`) when
    min(g.shape) ≤ ``svd_max``, else by Newton–Schulz (its error: see the module docstring)."""
    if g.dim() != 2:
        raise GradkitError(f"orthogonalize takes a 2-D tensor, got shape {tuple(g.shape)}")
    if min(g.shape) <= svd_max:
        return orthogonalize_exact(g)
    x = g.to(torch.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-30)
    a, b, c = _NS_QUINTIC
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    for _ in range(ns_polish):
        x = 1.5 * x - 0.5 * (x @ x.T) @ x
    return (x.T if tall else x).to(g.dtype)


def _norm32(g: torch.Tensor) -> torch.Tensor:
    """‖g‖₂ accumulated in at least float32: an fp16 gradient's norm can overflow fp16 (> 65504)."""
    return torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32))


def steepest_direction(
    g: torch.Tensor, norm: str, *, svd_max: int = 256, ns_steps: int = 5, ns_polish: int = 8
) -> torch.Tensor:
    """d* = argmax_{‖d‖ ≤ 1} ⟨g, d⟩ under ``norm`` (see the module table); zero for g = 0."""
    if norm == "linf":
        return torch.sign(g)
    if norm in ("l2", "rms") or (norm == "spectral" and g.dim() < 2):
        n2 = _norm32(g)
        if n2 == 0:
            return torch.zeros_like(g)
        scale = math.sqrt(g.numel()) if norm == "rms" else 1.0
        return (g.to(n2.dtype) * (scale / n2)).to(g.dtype)
    if norm == "spectral":
        if not g.any():
            return torch.zeros_like(g)
        flat = g.reshape(g.shape[0], -1)
        return orthogonalize(flat, svd_max=svd_max, ns_steps=ns_steps, ns_polish=ns_polish).view_as(g)
    raise GradkitError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def spectral_directions_batched(
    tensors: list[torch.Tensor], *, svd_max: int = 256, ns_steps: int = 5, ns_polish: int = 8
) -> list[torch.Tensor]:
    """``steepest_direction(t, "spectral")`` of each tensor, the exact ones batched: the matrices (more
    than 2-D: flattened to (shape[0], −1)) of one shape, dtype and device whose smaller side is at most
    ``svd_max`` go through one :func:`orthogonalize_exact`; the rest one by one."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    batches: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.dim() >= 2 and min(t.shape[0], t[0].numel()) <= svd_max:
            batches.setdefault((t.shape, t.dtype, t.device), []).append(i)
        else:
            out[i] = steepest_direction(
                t, "spectral", svd_max=svd_max, ns_steps=ns_steps, ns_polish=ns_polish
            )
    for (shape, _, _), members in batches.items():
        stacked = torch.stack([tensors[i].reshape(shape[0], -1) for i in members])
        for i, d in zip(members, orthogonalize_exact(stacked).unbind(), strict=True):
            out[i] = d.view(shape)
    return out  # type: ignore[return-value]


def norm_of(d: torch.Tensor, norm: str) -> torch.Tensor:
    """‖d‖ in ``norm`` (for 1-D tensors ``"spectral"`` is ‖·‖₂, for >2-D the flattened matrix's)."""
    if norm == "l2" or (norm == "spectral" and d.dim() < 2):
        return d.norm()
    if norm == "rms":
        return d.norm() / math.sqrt(d.numel())
    if norm == "linf":
        return d.abs().max()
    if norm == "spectral":
        return torch.linalg.matrix_norm(d.reshape(d.shape[0], -1).to(torch.float64), ord=2).to(d.dtype)
    raise GradkitError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def dual_norm_of(g: torch.Tensor, norm: str) -> torch.Tensor:
    """‖g‖_* = max_{‖d‖ ≤ 1} ⟨g, d⟩ for ``norm``: ‖g‖₂, √n‖g‖₂, ‖g‖₁, or the nuclear norm."""
    if norm == "l2" or (norm == "spectral" and g.dim() < 2):
        return g.norm()
    if norm == "rms":
        return g.norm() * math.sqrt(g.numel())
    if norm == "linf":
        return g.abs().sum()
    if norm == "spectral":
        return torch.linalg.matrix_norm(g.reshape(g.shape[0], -1).to(torch.float64), ord="nuc").to(g.dtype)
    raise GradkitError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


class SteepestDescent(Optimizer):
    """Steepest descent under a norm: θ ← θ − lr · argmax_{‖d‖≤1} ⟨m, d⟩ for each parameter tensor.

    ``norm``: ``"l2"`` (normalised gradient descent), ``"rms"`` (normalised, scaled by √n so that the
    step's RMS is lr), ``"linf"`` (sign descent, the β→0 limit of Adam), ``"spectral"`` (U Vᵀ of the
    gradient's SVD for matrices; Bernstein & Newhouse 2024). m is the gradient, or with
    ``momentum=μ`` the buffer b ← μb + g (Nesterov: g + μb). Decoupled ``weight_decay`` λ: θ ← θ(1 − lr·λ).
    Every setting is per param group; state is the momentum buffer only. See the module docstring for
    the SVD / Newton–Schulz choice (``svd_max``, ``ns_steps``, ``ns_polish``) and the 1-D fall-back.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        norm: str = "l2",
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        svd_max: int = 256,
        ns_steps: int = 5,
        ns_polish: int = 8,
        foreach: bool | None = None,
    ):
        if not lr >= 0.0:
            raise GradkitError(f"lr must be >= 0, got {lr}")
        if norm not in NORMS:
            raise GradkitError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if not 0.0 <= momentum < 1.0:
            raise GradkitError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum <= 0:
            raise GradkitError("nesterov=True needs momentum > 0")
        if not weight_decay >= 0.0:
            raise GradkitError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(
            lr=lr,
            norm=norm,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            svd_max=svd_max,
            ns_steps=ns_steps,
            ns_polish=ns_polish,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise GradkitError("SteepestDescent does not support sparse gradients")
            sharded = [p for p in params if is_dtensor(p)]
            if sharded:
                self._sharded_step(group, sharded)
                params = [p for p in params if not is_dtensor(p)]
                if not params:
                    continue
            lr, mu, wd, norm = group["lr"], group["momentum"], group["weight_decay"], group["norm"]
            grads = [p.grad for p in params]
            if mu > 0:
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)
                m = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
            else:
                m = grads
            if wd > 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            use_foreach = group["foreach"] if group["foreach"] is not None else True
            if norm == "linf" and use_foreach:
                torch._foreach_add_(params, torch._foreach_sign(m), alpha=-lr)
            elif norm == "spectral" and use_foreach:
                options = {k: group[k] for k in ("svd_max", "ns_steps", "ns_polish")}
                torch._foreach_add_(params, spectral_directions_batched(m, **options), alpha=-lr)
            elif norm in ("l2", "rms") and use_foreach:
                low = [t.dtype in (torch.float16, torch.bfloat16) for t in m]
                if not any(low):
                    norms = torch._foreach_norm(m)
                elif all(low):
                    norms = torch._foreach_norm(m, dtype=torch.float32)
                else:
                    norms = [_norm32(t) for t in m]
                scales = [
                    0.0
                    if float(n) == 0
                    else -lr * (math.sqrt(t.numel()) if norm == "rms" else 1.0) / float(n)
                    for n, t in zip(norms, m, strict=True)
                ]
                torch._foreach_add_(params, torch._foreach_mul(m, scales))
            else:
                for p, t in zip(params, m, strict=True):
                    d = steepest_direction(
                        t,
                        norm,
                        svd_max=group["svd_max"],
                        ns_steps=group["ns_steps"],
                        ns_polish=group["ns_polish"],
                    )
                    p.add_(d, alpha=-lr)
        return loss

    def _sharded_step(self, group: dict, params: list[torch.Tensor]) -> None:
        """The step of FSDP2-sharded parameters, each rank on its own rows (see the module docstring)."""
        lr, mu, wd, norm = group["lr"], group["momentum"], group["weight_decay"], group["norm"]
        moments = []
        for p in params:
            check_layout(p)
            g = local(p.grad)
            if mu > 0:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = local(state["momentum_buffer"])
                buf.mul_(mu).add_(g)
                g = g.add(buf, alpha=mu) if group["nesterov"] else buf
            moments.append(g)
        if wd > 0:
            for p in params:
                local(p).mul_(1.0 - lr * wd)
        options = {k: group[k] for k in ("svd_max", "ns_steps", "ns_polish")}
        matrices = [i for i, p in enumerate(params) if norm == "spectral" and p.ndim >= 2]
        whole_directions = spectral_directions(
            [(params[i], moments[i]) for i in matrices],
            lambda whole: steepest_direction(whole, "spectral", **options),
        )
        directions = dict(zip(matrices, whole_directions, strict=True))
        for i, (p, m) in enumerate(zip(params, moments, strict=True)):
            if i in directions:
                d = directions[i]
            elif norm == "linf":
                d = torch.sign(m)
            else:  # l2, rms, and spectral's 1-D fall-back (the l2 step): the whole tensor's norm
                n2 = global_norm(p, m)
                scale = math.sqrt(p.numel()) if norm == "rms" else 1.0
                d = torch.zeros_like(m) if n2 == 0 else (m.to(n2.dtype) * (scale / n2)).to(m.dtype)
            local(p).add_(d, alpha=-lr)
