"""dynamics_char_transformer: steepest descent under each norm against AdamW, SGD + momentum and
torch's Muon on a tiny char-level transformer.

Model: ``gradkit.models.toy_transformer`` (Pre-LN, tied embeddings) on Tiny Shakespeare, first 90%
of the text to train, last 10% held out. Every batch is ``--batch`` windows of ``--context``
characters drawn i.i.d. with a seeded generator (the same data order for every optimiser at a seed);
the model's init comes from the same seed. Constant learning rate, no weight decay, no clipping.

Optimisers: AdamW (β = 0.9, 0.999); SGD with momentum 0.9; ``gradkit.optim.SteepestDescent`` with
``norm`` = l2, rms, linf, spectral (momentum 0.9, Nesterov); ``torch.optim.Muon`` (momentum 0.95,
Nesterov, its default lr adjustment) on the blocks' 2-D weights plus AdamW (at AdamW's best lr) on
the rest (embeddings, LayerNorms, biases).

Protocol (a CPU budget shortcut, stated in the docs): each optimiser's lr from a factor-2 grid of
``--grid`` values is chosen on seed 0 alone by the lowest held-out loss at the end (mean of the last
two evaluations); that lr is then run with ``--seeds`` seeds. Held-out loss on a fixed set of
``--eval-windows`` windows every ``--eval-every`` steps; steps to the target loss interpolated.

    nice -n 10 python -m benchmarks.dynamics_char_transformer            # the measured run (~20 CPU-minutes)
    python -m benchmarks.dynamics_char_transformer --quick               # smoke run: seconds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import torch
from torch.nn import functional as F

from benchmarks.common import IMAGES, ROOT, report, save_figure
from gradkit.models import toy_transformer
from gradkit.optim import SteepestDescent

TEXT = ROOT / "data" / "tinyshakespeare" / "input.txt"
CACHE = ROOT / "benchmarks" / "runs" / "dynamics_char_transformer"

# lr grids, a factor 2 apart, centred on each rule's usual scale for a model this size; a grid whose
# best value was at an edge in the first pass got one more value beyond it
GRIDS = {
    "AdamW": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
    "SGD+momentum": [0.0625, 0.125, 0.25, 0.5, 1.0],
    "SD l2": [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4],
    "SD rms": [1e-3, 2e-3, 4e-3, 8e-3],
    "SD linf": [5e-4, 1e-3, 2e-3, 4e-3],
    "SD spectral": [0.01, 0.02, 0.04, 0.08, 0.16],
    "Muon+AdamW": [0.01, 0.02, 0.04, 0.08],
}


def load_tokens() -> tuple[torch.Tensor, torch.Tensor, int]:
    if not TEXT.is_file():
        raise SystemExit(
            f"{TEXT} not found: this benchmark reads data/tinyshakespeare/input.txt of the repository"
        )
    text = TEXT.read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    tokens = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(tokens))
    return tokens[:cut], tokens[cut:], len(chars)


def windows(
    tokens: torch.Tensor, n: int, context: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, len(tokens) - context - 1, (n,), generator=gen)
    w = tokens[start[:, None] + torch.arange(context + 1)]
    return w[:, :-1], w[:, 1:]


def make_optimizer(name: str, model, lr: float, adamw_lr: float):
    if name == "AdamW":
        return [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)]
    if name == "SGD+momentum":
        return [torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)]
    if name.startswith("SD "):
        return [SteepestDescent(model.parameters(), lr=lr, norm=name[3:], momentum=0.9, nesterov=True)]
    if name == "Muon+AdamW":
        hidden = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
        ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [
            torch.optim.Muon(hidden, lr=lr, momentum=0.95, nesterov=True, weight_decay=0.0),
            torch.optim.AdamW(rest, lr=adamw_lr, weight_decay=0.0),
        ]
    raise ValueError(name)


def same_run(a: str, b: str) -> bool:
    """Cache keys match; AdamW's lr (field 3) only matters to Muon+AdamW, which uses it on its 1-D params."""
    pa, pb = a.split("|"), b.split("|")
    if pa[0] != "Muon+AdamW":
        pa[3] = pb[3] = "-"
    return pa == pb


def train(args, data, vocab, name: str, lr: float, seed: int, adamw_lr: float) -> dict:
    key = f"{name}|{lr:g}|{seed}|{adamw_lr:g}|{args.steps}|{args.d_model}|{args.layers}|{args.batch}"
    CACHE.mkdir(parents=True, exist_ok=True)
    cache = CACHE / ("quick.jsonl" if args.quick else "runs.jsonl")
    if cache.exists():
        for line in cache.read_text().splitlines():
            rec = json.loads(line)
            if same_run(rec["key"], key):
                return rec
    train_tokens, (ex, ey) = data
    gen = torch.Generator().manual_seed(seed)
    model = toy_transformer(
        vocab, args.d_model, args.layers, args.heads, norm="pre", max_len=args.context, generator=gen
    )
    opts = make_optimizer(name, model, lr, adamw_lr)
    data_gen = torch.Generator().manual_seed(1000 + seed)

    def held_out() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(ex).flatten(0, 1), ey.flatten()).item()

    steps, losses, walls = [0], [held_out()], [0.0]
    wall = 0.0
    for step in range(1, args.steps + 1):
        x, y = windows(train_tokens, args.batch, args.context, data_gen)
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        for o in opts:
            o.step()
        wall += time.perf_counter() - t0
        if not math.isfinite(loss.item()):
            steps.append(step)
            losses.append(float("inf"))
            walls.append(wall)
            break
        if step % args.eval_every == 0 or step == args.steps:
            steps.append(step)
            losses.append(held_out())
            walls.append(wall)
    rec = {"key": key, "name": name, "lr": lr, "seed": seed, "steps": steps, "loss": losses, "wall": walls}
    with cache.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{name:14s} lr={lr:<8g} seed={seed} final={losses[-1]:.4f} wall={wall:.1f}s", flush=True)
    return rec


def interleaved_ms_per_step(
    args, data, vocab, best: dict, adamw_lr: float, rounds: int = 5, steps: int = 8
) -> dict:
    """ms per training step of each optimiser at its best lr, timed round-robin in one process (``rounds``
    turns of ``steps`` steps each, median of the turns), so every optimiser sees the same load on a shared CPU."""
    train_tokens, _ = data
    state = {}
    for name in best:
        model = toy_transformer(
            vocab,
            args.d_model,
            args.layers,
            args.heads,
            norm="pre",
            max_len=args.context,
            generator=torch.Generator().manual_seed(0),
        )
        state[name] = (model, make_optimizer(name, model, best[name], adamw_lr))
    gen = torch.Generator().manual_seed(7)
    times: dict[str, list[float]] = {name: [] for name in best}
    for r in range(rounds + 1):
        for name, (model, opts) in state.items():
            batches = [windows(train_tokens, args.batch, args.context, gen) for _ in range(steps)]
            t0 = time.perf_counter()
            for x, y in batches:
                for o in opts:
                    o.zero_grad(set_to_none=True)
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
                for o in opts:
                    o.step()
            if r > 0:  # the first round warms up
                times[name].append(1000 * (time.perf_counter() - t0) / steps)
    return {name: statistics.median(v) for name, v in times.items()}


def final_loss(rec: dict) -> float:
    tail = [v for v in rec["loss"][-2:]]
    return statistics.fmean(tail) if all(math.isfinite(v) for v in tail) else math.inf


def crossing(rec: dict, target: float, axis: str = "steps") -> float:
    xs, ys = rec[axis], rec["loss"]
    for i in range(1, len(ys)):
        if ys[i] <= target < ys[i - 1]:
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (ys[i - 1] - target) / (ys[i - 1] - ys[i])
    return math.inf


def run(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``), or
    None for a run that writes nothing (a smoke run)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--target", type=float, default=2.5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.eval_every, args.seeds, args.d_model, args.eval_windows = 10, 5, 2, 32, 16
    train_tokens, test_tokens, vocab = load_tokens()
    ex, ey = windows(test_tokens, args.eval_windows, args.context, torch.Generator().manual_seed(12345))
    data = (train_tokens, (ex, ey))
    grids = {k: (v[1:3] if args.quick else v) for k, v in GRIDS.items()}

    search, best = {}, {}
    adamw_lr = GRIDS["AdamW"][1]
    for name, grid in grids.items():
        recs = [train(args, data, vocab, name, lr, 0, adamw_lr) for lr in grid]
        search[name] = [(r["lr"], final_loss(r)) for r in recs]
        best[name] = min(search[name], key=lambda t: t[1])[0]
        if name == "AdamW":
            adamw_lr = best[name]
    runs = {
        name: [train(args, data, vocab, name, best[name], s, adamw_lr) for s in range(args.seeds)]
        for name in grids
    }

    ms = interleaved_ms_per_step(args, data, vocab, best, adamw_lr)
    rows = []
    for name, recs in runs.items():
        finals = [final_loss(r) for r in recs]
        cross = [crossing(r, args.target) for r in recs]
        ms_step = [
            1000 * r["wall"][-1] / r["steps"][-1] for r in recs
        ]  # as measured in each run (load varies)
        edge = best[name] in (grids[name][0], grids[name][-1])
        fin = [f for f in finals if math.isfinite(f)]
        reached = [c for c in cross if math.isfinite(c)]
        rows.append(
            [
                name,
                f"{best[name]:g}" + (" (grid edge)" if edge else ""),
                f"{statistics.fmean(fin):.4f} ± {statistics.pstdev(fin):.4f}" if fin else "diverged",
                f"{statistics.fmean(reached):.0f}"
                + ("" if len(reached) == len(cross) else f" ({len(reached)}/{len(cross)} seeds)")
                if reached
                else "not reached",
                f"{statistics.fmean(reached) * ms[name] / 1000:.1f}" if reached else "-",
                f"{ms[name]:.0f} ({ms[name] / ms['AdamW']:.2f}x)",
                f"{statistics.fmean(ms_step):.0f}",
            ]
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, (name, recs) in enumerate(runs.items()):
        color = f"C{i}"
        for j, r in enumerate(recs):
            ys = [min(v, 5.0) for v in r["loss"]]
            axes[0].plot(
                r["steps"],
                ys,
                color=color,
                alpha=0.8,
                label=f"{name} (lr {best[name]:g})" if j == 0 else None,
            )
            axes[1].plot([k * ms[name] / 1000 for k in r["steps"]], ys, color=color, alpha=0.8)
    xl2 = "training time (s): step x ms/step timed interleaved, 1 thread"
    for ax, xl in zip(axes, ("step", xl2), strict=True):
        ax.axhline(args.target, color="grey", ls=":", lw=1)
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats/char)")
    axes[0].set_ylim(top=4.5)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"toy transformer d={args.d_model}, {args.layers} layers, ctx {args.context}, batch {args.batch}: {args.seeds} seeds at each best lr"
    )
    plot = IMAGES / "dynamics_char_transformer.png"
    if args.quick:  # a smoke run writes nothing the docs read
        plt.close(fig)
        print("\n".join(" | ".join(map(str, r)) for r in rows))
        return
    save_figure(fig, plot)

    n_params = sum(
        p.numel()
        for p in toy_transformer(
            vocab, args.d_model, args.layers, args.heads, norm="pre", max_len=args.context
        ).parameters()
    )
    return {
        "name": "dynamics_char_transformer",
        **{
            "title": "Steepest descent under each norm vs AdamW, SGD+momentum and Muon on a char transformer",
            "claim": "Which geometry trains a small transformer fastest: steepest descent under l2 (normalised GD), "
            "RMS, l-infinity (sign descent) or the spectral norm (orthogonalised updates, what Muon approximates), "
            "against AdamW and SGD+momentum.",
            "tables": [
                {
                    "caption": f"Held-out loss after {args.steps} steps and steps to held-out loss {args.target} "
                    f"({args.seeds} seeds at the lr chosen on seed 0; mean ± sd).",
                    "columns": [
                        "optimiser",
                        "best lr",
                        "final held-out loss",
                        f"steps to {args.target}",
                        f"seconds to {args.target} (steps x interleaved ms/step)",
                        "ms / step, interleaved (vs AdamW)",
                        "ms / step as run",
                    ],
                    "rows": rows,
                },
                {
                    "caption": "lr search on seed 0 (final held-out loss per lr; inf = diverged).",
                    "columns": ["optimiser", "lr: final loss"],
                    "rows": [[n, ", ".join(f"{lr:g}: {v:.3f}" for lr, v in s)] for n, s in search.items()],
                },
            ],
            "plots": [str(plot.relative_to(ROOT))],
            "notes": [
                f"Model: gradkit.models.toy_transformer(vocab={vocab}, d_model={args.d_model}, n_layers={args.layers}, "
                f"n_heads={args.heads}, norm='pre'), {n_params} parameters, context {args.context}, batch {args.batch} windows, "
                f"{args.steps} steps, constant lr, no weight decay. Held-out: {args.eval_windows} fixed windows of the last 10% of Tiny Shakespeare.",
                "CPU shortcut: the lr is chosen on seed 0 only (a 4-5 value factor-2 grid, extended by one value where the first "
                "pass's best was at an edge), then 3 seeds run at it; "
                "300 steps is far from convergence, so this ranks early training speed only.",
                "SteepestDescent runs with momentum 0.9 (Nesterov), its norm per tensor; Muon+AdamW is torch.optim.Muon on the blocks' "
                "2-D weights (momentum 0.95, Nesterov) with AdamW at AdamW's best lr on embeddings, LayerNorms and biases.",
                "Timing: the runs shared 2 CPU cores with other jobs (torch.set_num_threads(1), nice 10), so the same run took "
                "from 17 s to 160 s ('ms / step as run'). The time axis and the seconds column therefore use each optimiser's "
                "ms/step timed round-robin in one process at the end (5 turns of 8 steps each, median), where all share one load.",
            ],
            "raw": {
                "search": search,
                "best": best,
                "ms_per_step_interleaved": ms,
                "runs": runs,
                "args": vars(args),
            },
        },
    }


def main() -> None:
    report(run())


if __name__ == "__main__":
    main()
