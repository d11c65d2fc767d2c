"""dynamics_path_deviation: how far do GD, heavy ball and Nesterov stray from the gradient flow, how
does that scale with lr, and where does each become unstable against 2/λ_max?

On the three problems of ``dynamics_problems.py`` (ill-conditioned quadratic, logistic regression on
frozen MiniLM SST-2 embeddings, a small MLP on them), with λ_max the Hessian's largest eigenvalue at
θ0 (``gradkit.dynamics.hessian_max_eigenvalue``) and lrs η = c/λ_max, c ∈ {1, 1/2, 1/4, 1/8, 1/16}:

1. GD: max_k ‖θ_k − θ_flow(kη)‖ over a fixed flow horizon T (``gradkit.dynamics.path_deviation``),
   and the slope of log deviation against log η (Euler is first order: slope 1).
2. Heavy ball and Nesterov (torch SGD, μ = 0.9): deviation from the damped flow
   θ'' + γθ' = −∇L, γ = (1 − μ)/√η at t = k√η (over a fixed horizon in that time), and from the
   plain gradient flow at t = kη (unscaled) and at t = kη/(1 − μ) (the overdamped limit, where
   momentum "travels" 1/(1 − μ) = 10 times as far per step as GD).
3. Instability: the smallest lr, on a grid of multiples of each method's bound for a quadratic
   (GD 2/λ, heavy ball 2(1 + μ)/λ, torch's Nesterov 2(1 + μ)/((1 + 2μ)λ)), at which 300 steps end
   above the starting loss.

    nice -n 10 python -m benchmarks.dynamics_path_deviation     # ~5 CPU-minutes (+1 the first time: embeddings)
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from benchmarks.common import IMAGES, ROOT, save_figure, write_result
from benchmarks.dynamics_problems import PROBLEMS
from gradkit.dynamics import hessian_max_eigenvalue, loglog_slope, path_deviation

MU = 0.9
FRACTIONS = [1.0, 0.5, 0.25, 0.125, 0.0625]
MOM_FRACTIONS = [0.25, 1 / 16, 1 / 64, 1 / 256]  # momentum reaches its ODE limits only at smaller lr
# flow horizons in units of 1/λ_max (GD), and in the damped flow's time t = k·sqrt(η) (times sqrt(1/λ_max))
HORIZON = {"quadratic": 100.0, "logistic": 100.0, "mlp": 20.0}
M_HORIZON = {"quadratic": 20.0, "logistic": 20.0, "mlp": 6.0}
TOL = dict(rtol=1e-9, atol=1e-11)


def sgd(mu=0.0, nesterov=False):
    return lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=mu, nesterov=nesterov)


def bound(kind: str, lam: float) -> float:
    if kind == "GD":
        return 2 / lam
    if kind == "heavy ball":
        return 2 * (1 + MU) / lam
    return 2 * (1 + MU) / ((1 + 2 * MU) * lam)


def unstable(loss_fn, theta0, lr, kind, steps=300) -> bool:
    theta = theta0.clone().requires_grad_(True)
    opt = sgd(0.0 if kind == "GD" else MU, kind == "Nesterov")([theta], lr)
    start = float(loss_fn(theta0))
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(theta)
        if not math.isfinite(float(loss.detach())) or float(loss.detach()) > 1e6 * start:
            return True
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(loss_fn(theta))
    return not math.isfinite(end) or end > start


def run() -> dict[str, Any]:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``)."""
    torch.set_num_threads(1)
    t_start = time.process_time()
    raw, dev_rows, mom_rows, stab_rows = {}, [], [], []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for ax, (name, make) in zip(axes, PROBLEMS.items(), strict=True):
        loss_fn, theta0 = make(0)
        lam = hessian_max_eigenvalue(loss_fn, theta0)
        lrs = [c / lam for c in FRACTIONS]
        mlrs = [c / lam for c in MOM_FRACTIONS]
        T, Tm = HORIZON[name] / lam, M_HORIZON[name] / math.sqrt(lam)
        curves = {}
        for label, factory in (("GD", sgd()), ("heavy ball", sgd(MU)), ("Nesterov", sgd(MU, True))):
            refs = ["flow"] if label == "GD" else ["momentum", "flow", "rescaled"]
            for ref in refs:
                devs = []
                for lr in lrs if label == "GD" else mlrs:
                    if ref == "momentum":
                        steps = max(1, round(Tm / math.sqrt(lr)))
                    elif ref in ("rescaled", "flow") and label != "GD":
                        steps = max(1, round(T * (1 - MU) / lr))
                    else:
                        steps = max(1, round(T / lr))
                    res = path_deviation(factory, loss_fn, theta0, lr, steps, reference=ref, **TOL)
                    devs.append(math.inf if res.diverged else res.max_deviation)
                curves[(label, ref)] = devs
                print(
                    f"{name:9s} {label:10s} vs {ref:8s}: " + ", ".join(f"{d:.3g}" for d in devs), flush=True
                )
        scale = float((theta0).norm())
        slope = {}
        for k, v in curves.items():
            xs, ys = (lrs[1:], v[1:]) if k[0] == "GD" else (mlrs, v)
            slope[k] = loglog_slope(xs, ys) if all(math.isfinite(y) and y > 0 for y in ys) else math.nan
        dev_rows.append(
            [
                name,
                theta0.numel(),
                f"{lam:.4g}",
                f"{curves[('GD', 'flow')][2] / scale:.3g}",
                f"{slope[('GD', 'flow')]:.3f}",
            ]
        )
        for label in ("heavy ball", "Nesterov"):
            mom_rows.append(
                [
                    name,
                    label,
                    " → ".join(f"{d / scale:.3g}" for d in curves[(label, "momentum")])
                    + f" (slope {slope[(label, 'momentum')]:.2f})",
                    " → ".join(f"{d / scale:.3g}" for d in curves[(label, "rescaled")])
                    + f" (slope {slope[(label, 'rescaled')]:.2f})",
                    " → ".join(f"{d / scale:.3g}" for d in curves[(label, "flow")]),
                ]
            )
        for (label, ref), devs in curves.items():
            style = {"GD": "-o", "heavy ball": "--s", "Nesterov": ":^"}[label]
            ax.loglog(
                lrs if label == "GD" else mlrs,
                [d / scale for d in devs],
                style,
                label=f"{label} vs {ref}" + (" t=k√η" if ref == "momentum" else ""),
            )
        ax.loglog(
            lrs,
            [curves[("GD", "flow")][2] / scale * lr / lrs[2] for lr in lrs],
            color="grey",
            lw=0.8,
            label="∝ η",
        )
        ax.set_title(f"{name} (n={theta0.numel()}, λ_max={lam:.3g})")
        ax.set_xlabel("lr η")
        ax.grid(alpha=0.3, which="both")
        # instability scan
        for kind in ("GD", "heavy ball", "Nesterov"):
            b = bound(kind, lam)
            mults = [0.25, 0.4, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98, 1.02, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0]
            first = next((m for m in mults if unstable(loss_fn, theta0, m * b, kind)), None)
            below = mults[mults.index(first) - 1] if first is not None and mults.index(first) > 0 else None
            stab_rows.append(
                [
                    name,
                    kind,
                    f"{b:.4g}",
                    "never up to 5x"
                    if first is None
                    else (f"({below}, {first}] x bound" if below else f"<= {first} x bound"),
                ]
            )
            print(stab_rows[-1], flush=True)
        raw[name] = {
            "lambda_max": lam,
            "lrs": lrs,
            "theta0_norm": scale,
            "curves": {f"{k[0]}|{k[1]}": v for k, v in curves.items()},
        }
    axes[0].set_ylabel("max_k ‖θ_k − θ_ref(t_k)‖ / ‖θ0‖")
    axes[0].legend(fontsize=7)
    plot = IMAGES / "dynamics_path_deviation.png"
    save_figure(fig, plot)
    cpu = time.process_time() - t_start
    return {
        "name": "dynamics_path_deviation",
        **{
            "title": "Optimisers as integrators: deviation from the gradient flow and the stability limit",
            "claim": "GD is Euler's method for dθ/dt = −∇L: its deviation from the flow is O(η) (slope 1 on a log-log plot); "
            "heavy ball and Nesterov follow θ'' + γθ' = −∇L at t = k√η, and in the overdamped limit the plain flow at "
            "t = kη/(1 − μ); each is unstable past its bound on 2/λ_max.",
            "tables": [
                {
                    "caption": "GD against the gradient flow at t = kη, over t ≤ T (T = 100/λ_max; MLP 20/λ_max): max deviation "
                    "relative to ‖θ0‖ at η = 1/(4λ_max), and the log-log slope over η = 1/(2λ_max) … 1/(16λ_max).",
                    "columns": [
                        "problem",
                        "parameters",
                        "λ_max at θ0",
                        "deviation at η = 0.25/λ_max",
                        "slope",
                    ],
                    "rows": dev_rows,
                },
                {
                    "caption": f"Momentum μ = {MU} (torch SGD) at η = (1/4, 1/16, 1/64, 1/256)/λ_max: max deviation / ‖θ0‖ from "
                    "three references (log-log slope in brackets): the damped flow θ'' + γθ' = −∇L, γ = (1 − μ)/√η, at t = k√η (over "
                    f"a fixed time in that clock), the gradient flow at t = kη/(1 − μ) (over t ≤ T), and the gradient flow at t = kη "
                    "(the same steps as the middle column).",
                    "columns": [
                        "problem",
                        "method",
                        "vs damped flow, t = k√η",
                        "vs flow, t = kη/(1−μ)",
                        "vs flow, t = kη",
                    ],
                    "rows": mom_rows,
                },
                {
                    "caption": "Instability: the lr at which 300 full-batch steps end above the starting loss, as a multiple of the "
                    "quadratic-model bound (GD 2/λ, heavy ball 2(1+μ)/λ, torch Nesterov 2(1+μ)/((1+2μ)λ), λ = λ_max at θ0).",
                    "columns": ["problem", "method", "bound", "first unstable multiple"],
                    "rows": stab_rows,
                },
            ],
            "plots": [str(plot.relative_to(ROOT))],
            "notes": [
                "Problems: (a) ½θᵀAθ, n = 20, eigenvalues log-spaced in [1, 100]; (b) L2-regularised (1e-3) logistic regression "
                "on frozen all-MiniLM-L6-v2 mean-pooled embeddings of 2,000 SST-2 training sentences (384-d + bias); "
                "(c) a 384-32-2 tanh MLP on 500 of them. Full batch, float64, θ0 from seed 0.",
                "Reference flows: gradkit.dynamics (scipy DOP853, rtol 1e-9, atol 1e-11): their error is orders of magnitude below "
                "every deviation reported.",
                f"CPU time of this script: {cpu / 60:.1f} min (1 thread).",
            ],
            "raw": raw,
        },
    }


def report(result: dict[str, Any]) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` (with the machine and the command)."""
    write_result(result["name"], result)


def main() -> None:
    report(run())


if __name__ == "__main__":
    main()
