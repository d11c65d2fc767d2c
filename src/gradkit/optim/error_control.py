"""Gradient descent whose step size is set by error control, as an adaptive ODE solver sets its step.

Gradient descent θ₁ = θ₀ − h g(θ₀) is the explicit Euler step for dθ/dt = −∇L(θ). Its embedded
partner is Heun's method (the explicit trapezoidal rule, order 2), which needs g(θ₁) too:
θ₁ᴴ = θ₀ − (h/2)(g(θ₀) + g(θ₁)). Their difference estimates Euler's local error:

    e = θ₁ − θ₁ᴴ = (h/2) (g(θ₁) − g(θ₀))          (≈ (h²/2) H g: the change of the gradient along the step)

and is measured in the scaled RMS norm of Hairer, Nørsett & Wanner ("Solving ODEs I", 1993, §II.4)

    err = sqrt( mean_i ( e_i / (tol + rtol · max(|θ₀_i|, |θ₁_i|)) )² ).

A step with err ≤ 1 is accepted (θ₁ is kept: the method stays plain gradient descent, without local
extrapolation), else rejected (θ₀ is restored). Either way the next step size is

    h ← h · min(factor_max, max(factor_min, safety · err^(−1/2)))

(the exponent is 1/(q+1) with q = 1 the order of Euler; after a rejection the factor is at most 1).
A zero estimate (the gradient did not change along the step: a zero gradient, or a linear loss) says
nothing about how long a step would stay accurate, so it leaves h unchanged; h is also kept within
[lr_min, lr_max], lr_max being 1e6·lr unless given, so that after a near-flat stretch (where h grows
×factor_max per step) a curved region brings h back in log(lr_max/h_needed)/log(1/factor_min)
rejections (9 from lr_max to lr).
g(θ₁) of an accepted step is the next step's g(θ₀) ("first same as last"), so a step costs one
gradient evaluation plus one per rejection. With ``reuse_gradient=False`` each step evaluates g(θ₀)
afresh (two per step): use that when the closure draws a new mini-batch at each call of ``step``, so
both gradients of a step see the same batch.

Where the step size ends up: with err ≈ h² ‖Hg‖_rms / (2 tol) held near 1, h ≈ sqrt(2 tol / ‖Hg‖_rms):
a single scalar for all coordinates, set by the curvature along g and by ‖g‖ through ‖Hg‖ ≈ λ‖g‖
(h ∝ ‖g‖^(−1/2) along one eigen-direction); it is not a per-coordinate rule like Adam's. The
benchmark ``benchmarks/dynamics_error_control.py`` measures it.

Use like ``torch.optim.LBFGS``: ``step(closure)`` with a closure that zeroes the gradients, computes the
loss, calls ``backward()`` and returns the loss. ``step`` returns the loss at θ₀ (where the step began).
One param group (one step size for every parameter).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from gradkit.errors import GradkitError


class ErrorControlledGD(Optimizer):
    """Gradient descent with the step size chosen by an embedded Euler/Heun error estimate.

    Args:
        lr: the first step size h₀ (later ones come from the controller).
        tol: absolute error allowed per coordinate per step (``atol`` of an ODE solver).
        rtol: relative error allowed, times max(|θ₀_i|, |θ₁_i|).
        safety, factor_min, factor_max: the controller's safety factor and bounds on h's change.
        lr_min, lr_max: bounds on h; a step that would need h < lr_min raises :class:`GradkitError`.
            ``lr_max`` defaults to 1e6·lr (finite, so that h can always shrink back within
            ``max_rejects`` rejections).
        max_rejects: rejections allowed within one ``step`` before it raises.
        reuse_gradient: reuse the gradient at the accepted point as the next step's (see module doc).

    ``flow_time`` is the sum of accepted step sizes (the time of the gradient flow the iterate
    approximates); ``last_lr`` the last accepted h; ``stats`` counts steps, rejections, evaluations.
    The optimiser's whole state (h, counters, the cached gradient and loss) is in ``state_dict()``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        tol: float = 1e-3,
        rtol: float = 0.0,
        *,
        safety: float = 0.9,
        factor_min: float = 0.2,
        factor_max: float = 5.0,
        lr_min: float = 0.0,
        lr_max: float | None = None,
        max_rejects: int = 50,
        reuse_gradient: bool = True,
    ):
        if not lr > 0:
            raise GradkitError(f"lr (the first step size) must be > 0, got {lr}")
        if not tol > 0 or not rtol >= 0:
            raise GradkitError(f"tol must be > 0 and rtol >= 0, got tol={tol}, rtol={rtol}")
        if not (0 < safety <= 1 and 0 < factor_min < 1 < factor_max):
            raise GradkitError("need 0 < safety <= 1 and 0 < factor_min < 1 < factor_max")
        if lr_max is None and lr > 0:
            lr_max = 1e6 * lr
        if not (0 <= lr_min <= lr <= lr_max and math.isfinite(lr_max)):
            raise GradkitError(f"need 0 <= lr_min <= lr <= lr_max < inf, got {lr_min}, {lr}, {lr_max}")
        defaults = dict(
            lr=lr,
            tol=tol,
            rtol=rtol,
            safety=safety,
            factor_min=factor_min,
            factor_max=factor_max,
            lr_min=lr_min,
            lr_max=lr_max,
            max_rejects=max_rejects,
            reuse_gradient=reuse_gradient,
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise GradkitError("ErrorControlledGD takes one param group (one step size for all parameters)")

    # the controller's state lives in the state of the first parameter (as LBFGS keeps its own)
    @property
    def _ctrl(self) -> dict:
        group = self.param_groups[0]
        state = self.state[group["params"][0]]
        if "h" not in state:
            state.update(h=float(group["lr"]), flow_time=0.0, last_lr=0.0, steps=0, rejected=0, grad_evals=0)
        return state

    @property
    def flow_time(self) -> float:
        return self._ctrl["flow_time"]

    @property
    def last_lr(self) -> float:
        return self._ctrl["last_lr"]

    @property
    def stats(self) -> dict:
        c = self._ctrl
        return {k: c[k] for k in ("steps", "rejected", "grad_evals", "h", "last_lr", "flow_time")}

    def _evaluate(self, closure, params) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise GradkitError("ErrorControlledGD needs a closure that returns the loss")
        self._ctrl["grad_evals"] += 1
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        return torch.as_tensor(loss).detach().clone(), grads

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise GradkitError(
                "ErrorControlledGD.step needs a closure (it evaluates the gradient twice a step)"
            )
        group = self.param_groups[0]
        params = list(group["params"])
        ctrl = self._ctrl
        cached = group["reuse_gradient"] and all("grad0" in self.state[p] for p in params)
        if cached:
            loss0 = ctrl["loss0"]
            g0 = [self.state[p]["grad0"] for p in params]
        else:
            loss0, g0 = self._evaluate(closure, params)
        x0 = [p.detach().clone() for p in params]
        n = sum(p.numel() for p in params)
        tol, rtol = group["tol"], group["rtol"]
        h = min(max(ctrl["h"], group["lr_min"]), group["lr_max"])
        for attempt in range(group["max_rejects"] + 1):
            torch._foreach_add_(params, g0, alpha=-h)
            loss1, g1 = self._evaluate(closure, params)
            sq = 0.0
            for p, x, a, b in zip(params, x0, g0, g1, strict=True):
                e = (b - a).mul_(h / 2)
                if rtol > 0:
                    e.div_(torch.maximum(x.abs(), p.detach().abs()).mul_(rtol).add_(tol))
                else:
                    e.div_(tol)
                sq += float(e.square().sum(dtype=torch.float64))
            err = math.sqrt(sq / max(n, 1))
            if not (math.isfinite(err) and bool(torch.isfinite(loss1).all())):
                err = math.inf
            factor = 1.0 if err == 0 else group["safety"] * err**-0.5
            factor = min(group["factor_max"], max(group["factor_min"], factor))
            if err <= 1.0:
                ctrl["flow_time"] += h
                ctrl["last_lr"] = h
                ctrl["steps"] += 1
                ctrl["h"] = min(
                    max(h * (min(factor, 1.0) if attempt else factor), group["lr_min"]), group["lr_max"]
                )
                if group["reuse_gradient"]:
                    ctrl["loss0"] = loss1
                    for p, b in zip(params, g1, strict=True):
                        self.state[p]["grad0"] = b
                return loss0
            ctrl["rejected"] += 1
            for p, x in zip(params, x0, strict=True):
                p.copy_(x)
            new_h = h * min(factor, 1.0)
            if new_h < group["lr_min"] or new_h == 0.0:
                break
            h = new_h
        for p, g in zip(params, g0, strict=True):  # leave θ₀ and its gradient as they were
            p.grad = g.clone()
        raise GradkitError(
            f"ErrorControlledGD: no step of size >= lr_min={group['lr_min']} met tol={tol} within "
            f"{group['max_rejects']} rejections (last h={h:.3g}, err={err:.3g}); raise tol or lower lr_min"
        )
