"""dynamics_error_control: ErrorControlledGD (step size from a local error estimate) against tuned SGD,
SGD + momentum and Adam, and what its step size ends up tracking.

Problems: the three full-batch problems of ``dynamics_problems.py`` (seed = θ0 / init) and the
char-level MLP of ``batch_size_sweep.py`` on Tiny Shakespeare (mini-batches of 64 windows; seed =
init and data order). Targets: full batch, L ≤ L_ref + 0.01·(L0 − L_ref) (quadratic: 1e-3·L0) with
L_ref from 300 L-BFGS iterations (strong Wolfe) at that seed; char MLP, held-out loss ≤ ``--char-target``.

Tuning (a CPU shortcut, stated in the docs): every method's lr (ErrorControlledGD: its tolerance,
factor 10 apart; the others a factor-2 grid) is chosen on seed 0 by the fewest gradient evaluations
to the target, then run at seeds 0, 1, 2. ErrorControlledGD uses ``reuse_gradient=True`` (one
gradient per accepted step) on full batches and ``reuse_gradient=False`` (two per step, both on the
step's batch) on the char MLP.

    nice -n 10 python -m benchmarks.dynamics_error_control      # ~6 CPU-minutes
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch
from torch.nn import functional as F

from benchmarks.batch_size_sweep import CharMLP, Windows, load_text
from benchmarks.common import IMAGES, ROOT, save_figure, write_result
from benchmarks.dynamics_problems import PROBLEMS
from gradkit.dynamics import hessian_max_eigenvalue, loglog_slope
from gradkit.optim import ErrorControlledGD

SEEDS = (0, 1, 2)
MAX_STEPS = {"quadratic": 3000, "logistic": 4000, "mlp": 4000, "char_mlp": 3000}


def grids(lam: float) -> dict[str, list[float]]:
    return {
        "SGD": [c / lam for c in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)],
        "SGD+momentum": [c / lam for c in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)],
        "Adam": [5e-3, 1e-2, 2e-2, 4e-2, 8e-2, 0.16, 0.32, 0.64],
        "ErrorControlledGD": [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5],
    }


CHAR_GRIDS = {
    "SGD": [0.1, 0.2, 0.4, 0.8],
    "SGD+momentum": [0.01, 0.02, 0.04, 0.08],
    "Adam": [1e-3, 2e-3, 4e-3, 8e-3],
    "ErrorControlledGD": [1e-2, 1e-3, 1e-4],
}


def make_opt(method: str, params, value: float, stochastic: bool):
    if method == "SGD":
        return torch.optim.SGD(params, lr=value)
    if method == "SGD+momentum":
        return torch.optim.SGD(params, lr=value, momentum=0.9)
    if method == "Adam":
        return torch.optim.Adam(params, lr=value)
    return ErrorControlledGD(params, lr=1e-4, tol=value, reuse_gradient=not stochastic)


def reference_loss(loss_fn, theta0) -> float:
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=300,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(loss_fn(theta))


def run_full(name, method, value, seed, target, trace=False) -> dict:
    loss_fn, theta0 = PROBLEMS[name](seed)
    theta = theta0.clone().requires_grad_(True)
    opt = make_opt(method, [theta], value, stochastic=False)
    evals = [0]

    def closure():
        evals[0] += 1
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss

    hs, gs = [], []
    t0 = time.perf_counter()
    out = {
        "method": method,
        "value": value,
        "seed": seed,
        "steps": math.inf,
        "evals": math.inf,
        "wall": math.inf,
    }
    for step in range(1, MAX_STEPS[name] + 1):
        try:
            loss = float(opt.step(closure).detach())
        except (
            Exception
        ):  # ErrorControlledGD gave up (it cannot with these settings, but never crash a sweep)
            break
        if not math.isfinite(loss):
            break
        if trace and method == "ErrorControlledGD":
            hs.append(opt.last_lr)
            gs.append(float(opt.state[theta]["grad0"].norm()))
        if loss <= target:  # the loss step() returns is at its start: θ_{step-1} reached the target
            out.update(steps=step - 1, evals=evals[0], wall=time.perf_counter() - t0)
            break
    if trace:
        out.update(h=hs, g=gs)
    return out


class CharProblem:
    def __init__(self, args):
        tokens, self.vocab = load_text(quick=False)
        cut = int(0.9 * len(tokens))
        self.train = Windows(tokens[:cut], 16)
        self.ex, self.ey = Windows(tokens[cut:], 16).sample(2048, torch.Generator().manual_seed(99))
        self.args = args

    def run(self, method, value, seed, target, trace=False) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CharMLP(self.vocab, 16, 16, 256)
        opt = make_opt(method, model.parameters(), value, stochastic=True)
        gen = torch.Generator().manual_seed(100 + seed)
        evals = [0]
        out = {
            "method": method,
            "value": value,
            "seed": seed,
            "steps": math.inf,
            "evals": math.inf,
            "wall": math.inf,
        }
        hs, gs, wall = [], [], 0.0
        for step in range(1, MAX_STEPS["char_mlp"] + 1):
            x, y = self.train.sample(64, gen)

            def closure(x=x, y=y):
                evals[0] += 1
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            t0 = time.perf_counter()
            try:
                loss = float(opt.step(closure).detach())
            except Exception:
                break
            wall += time.perf_counter() - t0
            if not math.isfinite(loss):
                break
            if trace and method == "ErrorControlledGD":
                hs.append(opt.last_lr)
                gs.append(math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters())))
            if step % 50 == 0:
                with torch.no_grad():
                    held = F.cross_entropy(model(self.ex), self.ey).item()
                if held <= target:
                    out.update(steps=step, evals=evals[0], wall=wall)
                    break
        if trace:
            out.update(h=hs, g=gs)
        return out


def thin(traces: dict, keep: int = 300) -> None:
    """Keep about ``keep`` evenly spaced (h, |g|) points of each trace in the JSON (the plot used them all)."""
    for tr in traces.values():
        every = max(1, math.ceil(len(tr.get("h", [])) / keep))
        tr["h"], tr["g"] = tr.get("h", [])[::every], tr.get("g", [])[::every]


def summary(recs) -> tuple[str, str, str, str]:
    ok = [r for r in recs if math.isfinite(r["steps"])]
    if not ok:
        return "not reached", "-", "-", "0/3"

    def f(key: str, fmt: str) -> str:
        values = [r[key] for r in ok]
        return f"{statistics.fmean(values):{fmt}} ± {statistics.pstdev(values):{fmt}}"

    return f("steps", ".0f"), f("evals", ".0f"), f("wall", ".2f"), f"{len(ok)}/{len(recs)}"


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--char-target", type=float, default=2.5)
    ap.add_argument("--skip-char", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    rows, search_rows, scaling_rows, raw = [], [], [], {}
    traces = {}
    for name in PROBLEMS:
        loss_fn, theta0 = PROBLEMS[name](0)
        lam = hessian_max_eigenvalue(loss_fn, theta0)
        targets = {}
        for seed in SEEDS:
            lf, th0 = PROBLEMS[name](seed)
            l0 = float(lf(th0))
            lref = 0.0 if name == "quadratic" else reference_loss(lf, th0)
            targets[seed] = lref + (1e-3 if name == "quadratic" else 1e-2) * (l0 - lref)
        raw[name] = {"lambda_max": lam, "targets": targets, "runs": {}}
        for method, grid in grids(lam).items():
            tries = [run_full(name, method, v, 0, targets[0]) for v in grid]
            best = min(tries, key=lambda r: (r["evals"], r["value"]))
            search_rows.append([name, method, ", ".join(f"{r['value']:.3g}: {r['evals']}" for r in tries)])
            recs = [best] + [run_full(name, method, best["value"], s, targets[s]) for s in SEEDS[1:]]
            raw[name]["runs"][method] = recs
            label = (
                "tol" if method == "ErrorControlledGD" else ("lr·λ_max" if method.startswith("SGD") else "lr")
            )
            shown = best["value"] * lam if label == "lr·λ_max" else best["value"]
            rows.append([name, method, f"{label} {shown:.3g}", *summary(recs)])
            print(rows[-1], flush=True)
        tol = raw[name]["runs"]["ErrorControlledGD"][0]["value"]
        traces[name] = run_full(
            name, "ErrorControlledGD", tol, 0, -math.inf if name == "quadratic" else targets[0], trace=True
        )
        traces[name]["lambda_max"] = lam
    # the loss floor at a fixed tolerance: on the stiff quadratic h settles at 2/λ_max and the stiff mode is held at tol
    floor_rows = []
    lam_q = hessian_max_eigenvalue(*PROBLEMS["quadratic"](0))
    for tol in (1e-2, 1e-3, 1e-4):
        loss_fn, theta0 = PROBLEMS["quadratic"](0)
        theta = theta0.clone().requires_grad_(True)
        opt = ErrorControlledGD([theta], lr=1e-4, tol=tol)

        def closure(opt=opt, theta=theta, loss_fn=loss_fn):
            opt.zero_grad()
            loss = loss_fn(theta)
            loss.backward()
            return loss

        at = {}
        for k in range(1, 3001):
            loss = float(opt.step(closure).detach())
            if k in (200, 1000, 3000):
                at[k] = loss
        floor_rows.append(
            [
                f"{tol:g}",
                *(f"{at[k]:.3g}" for k in (200, 1000, 3000)),
                f"{opt.last_lr * lam_q / 2:.3f}",
                opt.stats["rejected"],
            ]
        )
    if not args.skip_char:
        char = CharProblem(args)
        raw["char_mlp"] = {"target": args.char_target, "runs": {}}
        for method, grid in CHAR_GRIDS.items():
            tries = [char.run(method, v, 0, args.char_target) for v in grid]
            best = min(tries, key=lambda r: (r["evals"], r["value"]))
            search_rows.append(
                ["char_mlp", method, ", ".join(f"{r['value']:.3g}: {r['evals']}" for r in tries)]
            )
            recs = [best] + [char.run(method, best["value"], s, args.char_target) for s in SEEDS[1:]]
            raw["char_mlp"]["runs"][method] = recs
            label = "tol" if method == "ErrorControlledGD" else "lr"
            rows.append(["char_mlp", method, f"{label} {best['value']:.3g}", *summary(recs)])
            print(rows[-1], flush=True)
        traces["char_mlp"] = char.run(
            "ErrorControlledGD",
            raw["char_mlp"]["runs"]["ErrorControlledGD"][0]["value"],
            0,
            -math.inf,
            trace=True,
        )
        traces["char_mlp"]["h"] = traces["char_mlp"]["h"][:1000]
        traces["char_mlp"]["g"] = traces["char_mlp"]["g"][:1000]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(4.2 * len(traces), 3.8))
    for ax, (name, tr) in zip(axes, traces.items(), strict=True):
        h, g = tr["h"], tr["g"]
        if not h:
            continue
        half = len(h) // 2
        slope = loglog_slope(g[half:], h[half:]) if len(set(g[half:])) > 1 else math.nan
        lam = tr.get("lambda_max")
        stab = statistics.median(x * lam / 2 for x in h[half:]) if lam else math.nan
        scaling_rows.append(
            [
                name,
                len(h),
                f"{slope:.2f}",
                f"{statistics.median(h[half:]):.3g}",
                "-" if lam is None else f"{stab:.2f}",
            ]
        )
        ax.loglog(g, h, ".", ms=2, alpha=0.5)
        ax.set_xlabel("‖g‖ at the step's start")
        ax.set_title(f"{name}: slope {slope:.2f} (2nd half)")
        if lam:
            ax.axhline(2 / lam, color="grey", ls=":", lw=1, label="2/λ_max")
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("accepted step size h")
    plot = IMAGES / "dynamics_error_control.png"
    save_figure(fig, plot)
    cpu = time.process_time() - cpu0
    thin(traces)
    return {
        "name": "dynamics_error_control",
        **{
            "title": "ErrorControlledGD against tuned SGD, SGD+momentum and Adam",
            "claim": "A step size set by an embedded Euler/Heun error estimate (as ODE solvers do) reaches a target loss in "
            "as few gradient evaluations as tuned first-order methods, without an lr to tune; and its step tracks the "
            "curvature (the stability limit) rather than 1/|g| or Adam's per-coordinate rule.",
            "tables": [
                {
                    "caption": "To the target (full batch: 99% of the way from L0 to the L-BFGS optimum, quadratic 99.9%; char MLP: "
                    f"held-out loss {args.char_target}); mean ± sd over the seeds that reached it, setting chosen on seed 0.",
                    "columns": [
                        "problem",
                        "method",
                        "setting",
                        "steps",
                        "gradient evaluations",
                        "wall s",
                        "seeds reached",
                    ],
                    "rows": rows,
                },
                {
                    "caption": "The step ErrorControlledGD chooses (seed 0, best tolerance, full run): slope of log h against log ‖g‖ "
                    "over the second half of the run (−1 would be normalised GD, h ∝ 1/‖g‖), median h there, and median h/(2/λ_max).",
                    "columns": [
                        "problem",
                        "accepted steps",
                        "slope d log h / d log ‖g‖",
                        "median h",
                        "median h / (2/λ_max)",
                    ],
                    "rows": scaling_rows,
                },
                {
                    "caption": "The loss floor at a fixed tolerance (quadratic, seed 0, L0 = 126): error control bounds the error "
                    "per step, not the loss; h settles at the stability limit 2/λ_max, where the stiff mode neither grows nor "
                    "decays and is held at the tolerance, so the loss stops falling at a level ∝ tol² (an explicit ODE solver on a stiff problem).",
                    "columns": [
                        "tol",
                        "loss at step 200",
                        "at 1000",
                        "at 3000",
                        "final h / (2/λ_max)",
                        "rejected steps",
                    ],
                    "rows": floor_rows,
                },
                {
                    "caption": "Search on seed 0: setting: gradient evaluations to the target (inf = not reached within the cap).",
                    "columns": ["problem", "method", "setting: evaluations"],
                    "rows": search_rows,
                },
            ],
            "plots": [str(plot.relative_to(ROOT))],
            "notes": [
                "Step caps: quadratic 3000, logistic and MLP 4000, char MLP 3000 steps (held-out loss checked every 50 steps there).",
                "Char MLP: batch_size_sweep.py's CharMLP (context 16, embed 16, two tanh layers of 256), batch 64; ErrorControlledGD "
                "evaluates two gradients per step on the same batch (reuse_gradient=False).",
                "Wall times: 1 thread on 2 CPU cores shared with other jobs; gradient evaluations are the machine-independent count.",
                f"CPU time of this script: {cpu / 60:.1f} min.",
            ],
            "raw": {"results": raw, "traces": traces},
        },
    }


def report(result: dict[str, Any]) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` (with the machine and the command)."""
    write_result(result["name"], result)


def main() -> None:
    report(run())


if __name__ == "__main__":
    main()
