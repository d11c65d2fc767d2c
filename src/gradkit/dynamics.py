"""Optimisers as integrators of gradient flow: reference paths, path deviation, curvature.

Gradient descent with step η is the explicit Euler method for the gradient flow

    dθ/dt = −∇L(θ),   θ(0) = θ0,

so after k steps its iterate θ_k should be compared with the flow at time t = kη. Heavy-ball
momentum (Polyak 1964; ``torch.optim.SGD(momentum=μ)``) discretises the damped second-order system

    θ'' + γ θ' = −∇L(θ),   θ(0) = θ0, θ'(0) = 0,

(Qian 1999, "On the momentum term in gradient descent learning algorithms"; Su, Boyd & Candès 2016,
"A differential equation for modeling Nesterov's accelerated gradient method"): writing the update as
(θ_{k+1} − 2θ_k + θ_{k−1}) + (1 − μ)(θ_k − θ_{k−1}) = −η ∇L(θ_k) and matching it to
h²θ'' + (1 − μ)hθ' = −η∇L with the time step h = √η gives t_k = k√η and γ = (1 − μ)/√η.
Nesterov's form (torch's ``nesterov=True``) discretises the same system with a gradient-correction
term of order √η (Shi, Du, Jordan & Su 2018, the "high-resolution" ODE). When γ is large (η small
at fixed μ) the second-order system is overdamped and θ' ≈ −∇L/γ: momentum then follows the plain
gradient flow at the rescaled time t_k = kη/(1 − μ) — the usual "effective learning rate η/(1 − μ)".

Functions here are pure: they take ``loss_fn(theta) -> scalar tensor`` on a flat 1-D ``theta`` and
return tensors. :func:`module_loss` turns an ``nn.Module`` and a loss into that form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gradkit.errors import GradkitError

LossFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "PathDeviation",
    "flow_path",
    "hessian_max_eigenvalue",
    "loglog_slope",
    "module_loss",
    "momentum_flow_path",
    "path_deviation",
]


def _as_theta(theta0: torch.Tensor) -> torch.Tensor:
    if not isinstance(theta0, torch.Tensor) or theta0.dim() != 1 or not theta0.is_floating_point():
        raise GradkitError("theta0 must be a 1-D floating-point tensor (flatten the parameters first)")
    return theta0.detach()


def _grad64(loss_fn: LossFn, y: torch.Tensor) -> torch.Tensor:
    """∇L at a float64 point, checking that ``loss_fn`` really computed in float64."""
    with torch.enable_grad():
        x = y.detach().requires_grad_(True)
        loss = loss_fn(x)
        if loss.dtype != torch.float64:
            raise GradkitError(
                f"loss_fn returned a {loss.dtype} loss for a float64 theta: the reference flow is "
                "evaluated in float64 (DOP853 at rtol 1e-10 cannot converge on float32 gradients); "
                "make loss_fn compute in theta's dtype (gradkit.dynamics.module_loss does)"
            )
        (g,) = torch.autograd.grad(loss, x)
    return g


def _solve(rhs, y0: torch.Tensor, times: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    try:
        from scipy.integrate import solve_ivp
    except ImportError as err:  # pragma: no cover - scipy is present wherever the tests run
        raise GradkitError(
            "gradkit.dynamics needs scipy for its reference solver: pip install scipy"
        ) from err
    import numpy as np

    t = times.detach().to(torch.float64).cpu().numpy()
    if t.ndim != 1 or len(t) == 0 or t[0] < 0 or np.any(np.diff(t) < 0):
        raise GradkitError("times must be a non-empty 1-D sequence of non-negative, non-decreasing times")

    def f(_t, y):
        return rhs(torch.from_numpy(y)).numpy()

    y0n = y0.detach().to(torch.float64).cpu().numpy()
    if t[-1] == 0:
        return torch.from_numpy(np.repeat(y0n[None], len(t), 0))
    sol = solve_ivp(f, (0.0, float(t[-1])), y0n, method="DOP853", t_eval=t, rtol=rtol, atol=atol)
    if not sol.success:
        raise GradkitError(f"the reference solver failed: {sol.message}")
    return torch.from_numpy(sol.y.T.copy())


def flow_path(
    loss_fn: LossFn,
    theta0: torch.Tensor,
    times: Sequence[float] | torch.Tensor,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> torch.Tensor:
    """The gradient flow dθ/dt = −∇L(θ), θ(0) = θ0, at ``times``: a (len(times), n) float64 tensor.

    Solved by scipy's ``solve_ivp`` with DOP853 (Dormand & Prince's 8th-order embedded pair,
    Hairer, Nørsett & Wanner, "Solving ODEs I", 1993) at ``rtol=1e-10``, ``atol=1e-12`` in float64,
    the gradient by autograd, evaluated in float64 whatever θ0's dtype (``loss_fn`` is called with a
    float64 θ and must compute in its dtype, as :func:`module_loss`'s does; a float32 gradient's
    rounding would keep the step-size control from ever meeting these tolerances). Its local error per step is kept below ``atol + rtol·|θ_i|`` per
    coordinate; on the tests' quadratics (condition number up to 100, t up to 50) the result agrees
    with the closed form exp(−tA)θ0 to a relative error below 1e-8. Meant for small problems (the
    solver is explicit: a stiff L, with λ_max·t in the 1e5s, costs many gradient evaluations).
    """
    theta0 = _as_theta(theta0)
    times = torch.as_tensor(times, dtype=torch.float64)

    def rhs(y: torch.Tensor) -> torch.Tensor:
        return -_grad64(loss_fn, y)

    return _solve(rhs, theta0, times, rtol, atol)


def momentum_flow_path(
    loss_fn: LossFn,
    theta0: torch.Tensor,
    times: Sequence[float] | torch.Tensor,
    damping: float,
    *,
    velocity0: torch.Tensor | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> torch.Tensor:
    """The damped second-order flow θ'' + γθ' = −∇L(θ), θ(0) = θ0, θ'(0) = v0 (default 0), at ``times``.

    ``damping`` is γ. Heavy ball with momentum μ and lr η follows it with γ = (1 − μ)/√η at times
    t_k = k√η (Qian 1999; Su, Boyd & Candès 2016). Same solver and accuracy as :func:`flow_path`,
    applied to the first-order system (θ, v)' = (v, −γv − ∇L(θ)), the gradient evaluated in float64
    whatever θ0's dtype. Returns (len(times), n) float64.
    """
    theta0 = _as_theta(theta0)
    n = theta0.numel()
    v0 = torch.zeros(n, dtype=torch.float64) if velocity0 is None else velocity0.detach().to(torch.float64)
    times = torch.as_tensor(times, dtype=torch.float64)

    def rhs(y: torch.Tensor) -> torch.Tensor:
        x, v = y[:n], y[n:]
        return torch.cat([v, -damping * v - _grad64(loss_fn, x)])

    return _solve(rhs, torch.cat([theta0.to(torch.float64), v0]), times, rtol, atol)[:, :n]


@dataclass
class PathDeviation:
    """What :func:`path_deviation` measured. ``deviation[k] = ‖θ_k − θ_ref(times[k])‖₂``."""

    times: torch.Tensor  # (steps + 1,) the flow time matched to each iterate
    iterates: torch.Tensor  # (steps + 1, n) θ_0 .. θ_steps
    reference: torch.Tensor  # (steps + 1, n) the reference flow at ``times``
    deviation: torch.Tensor  # (steps + 1,)
    losses: torch.Tensor  # (steps + 1,) L(θ_k)
    diverged: bool  # an iterate or loss became non-finite (the run stopped there)

    @property
    def max_deviation(self) -> float:
        return float(self.deviation.max())

    @property
    def final_deviation(self) -> float:
        return float(self.deviation[-1])


def path_deviation(
    optimizer_factory: Callable[[list[torch.Tensor], float], torch.optim.Optimizer],
    loss_fn: LossFn,
    theta0: torch.Tensor,
    lr: float,
    steps: int,
    *,
    reference: str = "auto",
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> PathDeviation:
    """Run ``optimizer_factory([theta], lr)`` for ``steps`` steps from θ0; distance of θ_k from a flow.

    Each step is ``opt.step(closure)`` with a closure that zeroes the gradient, evaluates
    ``loss_fn(theta)``, back-propagates and returns the loss (so LBFGS-style optimisers work too).
    The reference and the time matched to iterate k:

    - ``"flow"``: the gradient flow at t_k = kη (plain gradient descent is its Euler method: the
      global error is O(η) on a finite horizon).
    - ``"momentum"``: the damped flow θ'' + γθ' = −∇L with γ = (1 − μ)/√η at t_k = k√η, μ read from
      the optimiser's ``momentum`` (heavy ball; Qian 1999, Su, Boyd & Candès 2016).
    - ``"rescaled"``: the gradient flow at t_k = kη/(1 − μ) (the overdamped limit of the above).
    - ``"auto"`` (default): ``"flow"``; with an optimiser that reports its own integrated time (an
      attribute ``flow_time``, as :class:`gradkit.optim.ErrorControlledGD`), that time is used.

    The optimiser runs in θ0's dtype; the reference flow is evaluated in float64 (see :func:`flow_path`).
    The run stops at the first non-finite iterate (``diverged=True``; the arrays are cut there).
    """
    theta0 = _as_theta(theta0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GradkitError(f"steps must be a positive integer, got {steps!r}")
    if reference not in ("auto", "flow", "momentum", "rescaled"):
        raise GradkitError(f"reference must be auto, flow, momentum or rescaled, got {reference!r}")
    theta = theta0.clone().requires_grad_(True)
    opt = optimizer_factory([theta], lr)
    mu = float(opt.param_groups[0].get("momentum", 0.0) or 0.0)
    if reference in ("momentum", "rescaled") and not 0.0 <= mu < 1.0:
        raise GradkitError(f"reference={reference!r} needs an optimiser with momentum in [0, 1), got {mu}")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss

    iterates, losses, own_times = [theta.detach().clone()], [], [0.0]
    diverged = False
    for _ in range(steps):
        loss = opt.step(closure)
        losses.append(float(torch.as_tensor(loss).detach()) if loss is not None else float("nan"))
        x = theta.detach().clone()
        if not torch.isfinite(x).all():
            diverged = True
            break
        iterates.append(x)
        own_times.append(float(getattr(opt, "flow_time", math.nan)))
    with torch.no_grad():
        last = float(loss_fn(iterates[-1]))
    losses = losses[: len(iterates) - 1] + [last]
    diverged = diverged or not math.isfinite(last)
    k = torch.arange(len(iterates), dtype=torch.float64)
    if reference == "momentum":
        times = k * math.sqrt(lr)
        ref = momentum_flow_path(loss_fn, theta0, times, (1 - mu) / math.sqrt(lr), rtol=rtol, atol=atol)
    else:
        if reference == "rescaled":
            times = k * lr / (1 - mu)
        elif reference == "auto" and hasattr(opt, "flow_time"):
            times = torch.tensor(own_times, dtype=torch.float64)
        else:
            times = k * lr
        ref = flow_path(loss_fn, theta0, times, rtol=rtol, atol=atol)
    its = torch.stack(iterates).to(torch.float64)
    return PathDeviation(
        times=times,
        iterates=its,
        reference=ref,
        deviation=(its - ref).norm(dim=1),
        losses=torch.tensor(losses, dtype=torch.float64),
        diverged=diverged,
    )


def hessian_max_eigenvalue(
    loss_fn: LossFn,
    theta: torch.Tensor,
    *,
    iters: int = 200,
    tol: float = 1e-7,
    generator: torch.Generator | None = None,
) -> float:
    """λ_max, the largest (most positive) eigenvalue of the Hessian ∇²L(θ), by the Lanczos method.

    Lanczos (1950; Golub & Van Loan, "Matrix Computations", §10.1) on Hessian-vector products
    Hv = ∇(∇L·v) by double back-propagation (Pearlmutter 1994), from a random unit start drawn with
    ``generator`` (the global RNG is not touched), with full reorthogonalisation (``iters`` vectors of
    θ's size are kept). After k products the tridiagonal T_k's largest eigenvalue θ_k (a Ritz value)
    is a lower bound of λ_max, and r_k = β_k·|s_k| (s the Ritz vector in T_k's basis) is the residual
    ‖Hy − θ_k y‖ of its Ritz vector y, so an eigenvalue of H lies within r_k of θ_k (Parlett, "The
    symmetric eigenvalue problem", 1980, Thm 4.5.1). It stops when r_k ≤ tol·ρ_k, ρ_k the largest
    |Ritz value| (a lower bound of ‖H‖₂), tol floored at 10× the eps of θ's dtype (or when the Krylov
    space is exhausted: θ_k is then exact), and returns θ_k: so an eigenvalue of H lies within tol·ρ_k
    of the result, and λ_max ≥ result. After ``iters`` products it returns the last θ_k without that
    guarantee. Unlike power iteration it needs no gap in |λ|: on an indefinite Hessian, or with ±λ at
    the top, it returns the most positive eigenvalue. With eigenvalues closer together than tol·ρ at
    the top, the eigenvalue within tol·ρ of the result may be one just below λ_max.
    At a point where the Hessian is positive semi-definite (any convex L) gradient descent on the
    local quadratic model is stable for η < 2/λ_max.
    """
    theta = _as_theta(theta)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
    v /= v.norm()
    x = theta.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    basis: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    ritz = 0.0
    tol = max(tol, 10 * torch.finfo(theta.dtype).eps)
    for _ in range(min(iters, theta.numel())):
        basis.append(v)
        (w,) = torch.autograd.grad(g, x, v, retain_graph=True)
        alphas.append(float(v @ w))
        for b in basis:  # twice-is-enough Gram–Schmidt against every earlier vector
            w = w - (b @ w) * b
        for b in basis:
            w = w - (b @ w) * b
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        ritz, scale = float(evals[-1]), float(evals.abs().max())
        if beta * abs(float(evecs[-1, -1])) <= tol * scale or beta <= 1e-12 * scale:
            return ritz
        betas.append(beta)
        v = w / beta
    return ritz


def module_loss(
    model: torch.nn.Module, loss_of_output: Callable[[object], torch.Tensor], *inputs
) -> tuple[LossFn, torch.Tensor]:
    """``(loss_fn, theta0)`` for a module: ``loss_fn(theta)`` runs ``model(*inputs)`` with the trainable
    parameters taken from the flat vector ``theta`` (``torch.func.functional_call``) and returns
    ``loss_of_output(output)``; ``theta0`` is the current parameters, flattened. The model runs in
    ``theta``'s dtype: its frozen parameters, floating-point buffers and floating-point tensor inputs are
    cast to it (so :func:`flow_path` can evaluate a float32 model in float64). The model is not changed.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def cast(t: object, dtype: torch.dtype) -> object:
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def loss_fn(theta: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, sizes)
        named = {n: cast(t, theta.dtype) for n, t in fixed.items()}
        named.update({n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)})
        args = tuple(cast(a, theta.dtype) for a in inputs)
        return loss_of_output(torch.func.functional_call(model, named, args))

    return loss_fn, theta0


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (the order p in y ∝ x^p)."""
    lx = torch.tensor([math.log(v) for v in x], dtype=torch.float64)
    ly = torch.tensor([math.log(v) for v in y], dtype=torch.float64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx @ ly) / (lx @ lx))
