"""init_warmup: does a 12-layer Post-LN transformer need learning-rate warmup where Pre-LN does not?

    nice -n 10 python -m benchmarks.init_warmup --steps 20 --seeds 1     # a smoke run (seconds)
    nice -n 10 python -m benchmarks.init_warmup                          # the measured curves

Char-level language model on Tiny Shakespeare (data/tinyshakespeare/input.txt, the first
90 % of the characters for training, the last 10 % held out), ``gradkit.models.toy_transformer`` with
12 blocks, Post-LN and Pre-LN, BERT init with real std 0.02. AdamW (betas 0.9/0.999, weight decay
0.01, no clipping) at lr 3e-4 and 1e-3; warmup 0 or 10 % of the steps (linear from 0), then a linear
decay to 0 in both cases; 3 seeds (the seed sets the init and the batch order; the held-out batches
are the same for every run). Sizes are small so the 24 runs fit a 2-core CPU (``--d-model 64``,
context 64, batch 16, 300 steps by default): the claim is about the optimisation at depth, not about
a good Shakespeare model. Everything runs on one thread.

Claim tested (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"; Liu et al.
2020, "Understanding the Difficulty of Training Transformers"): without warmup Post-LN diverges or
stalls at a learning rate where it trains with warmup, and Pre-LN trains without warmup.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from benchmarks.common import IMAGES, RESULTS, ROOT, save_figure, write_result
from gradkit.models import toy_transformer

PLATEAU_TOL = 0.05
DATA = ROOT / "data" / "tinyshakespeare" / "input.txt"


def load_text(path: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    text = path.read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(chars)


def batch(data: torch.Tensor, n: int, ctx: int, g: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(data) - ctx - 1, (n,), generator=g)
    return torch.stack([data[s : s + ctx + 1] for s in start.tolist()])


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warmup over ``warmup`` steps (from lr/warmup at step 0), then linear decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (steps - step) / max(1, steps - warmup))


def train_one(args, train, held, vocab, norm: str, lr: float, warmup_frac: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = toy_transformer(
        vocab, args.d_model, args.layers, args.heads, norm=norm, max_len=args.ctx, generator=g
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    warmup = int(round(warmup_frac * args.steps))
    data_g = torch.Generator().manual_seed(1000 + seed)
    curve, train_losses = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                val = statistics.fmean(lm_loss(model, b).item() for b in held)
            model.train()
            curve.append([step, val])
            if not math.isfinite(val):
                break
        if step == args.steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, warmup, lr)
        loss = lm_loss(model, batch(train, args.batch, args.ctx, data_g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_losses.append(loss.item())
    return {
        "norm": norm,
        "lr": lr,
        "warmup": warmup_frac,
        "seed": seed,
        "curve": curve,
        "final_val": curve[-1][1],
        "best_val": min(v for _, v in curve if math.isfinite(v))
        if any(math.isfinite(v) for _, v in curve)
        else math.nan,
        "train_loss_last10": statistics.fmean(train_losses[-10:]) if train_losses else math.nan,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--lrs", default="3e-4,1e-3")
    ap.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the tables, plot and notes from the runs in the existing JSON",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    train, val, vocab = load_text(DATA)
    held_g = torch.Generator().manual_seed(12345)
    held = [batch(val, args.batch, args.ctx, held_g) for _ in range(args.eval_batches)]
    lrs = [float(x) for x in args.lrs.split(",")]
    runs = []
    if args.report_only:
        raw = json.loads((RESULTS / "init_warmup.json").read_text())["raw"]
        for key in (
            "steps",
            "seeds",
            "layers",
            "d_model",
            "heads",
            "ctx",
            "batch",
            "eval_every",
            "eval_batches",
            "lrs",
        ):
            setattr(args, key, raw["args"][key])
        lrs = [float(x) for x in args.lrs.split(",")]
        runs = raw["runs"]
    for norm in ("post", "pre") if not args.report_only else ():
        for lr in lrs:
            for warmup in (0.0, 0.1):
                for seed in range(args.seeds):
                    r = train_one(args, train, held, vocab, norm, lr, warmup, seed)
                    runs.append(r)
                    print(
                        f"{norm}-LN lr {lr:g} warmup {warmup:.0%} seed {seed}: held-out loss "
                        f"{r['curve'][0][1]:.3f} -> {r['final_val']:.3f} (best {r['best_val']:.3f}), {r['seconds']:.0f} s",
                        flush=True,
                    )
    total = sum(r["seconds"] for r in runs)
    cpu = [r["cpu_seconds"] for r in runs if "cpu_seconds" in r]
    print(f"{len(runs)} runs in {total / 60:.1f} min")
    if args.no_write:
        return

    counts = torch.bincount(train, minlength=vocab).double()
    logp = (counts / counts.sum()).log()
    unigram = statistics.fmean(float(-logp[b[:, 1:]].mean()) for b in held)

    def plateau_steps(r) -> int:
        return args.eval_every * sum(
            1 for step, v in r["curve"] if step > 0 and abs(v - unigram) < PLATEAU_TOL
        )

    def group(norm, lr, warmup):
        return [r for r in runs if r["norm"] == norm and r["lr"] == lr and r["warmup"] == warmup]

    def mean_sd(values):
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) < len(values):
            return f"{len(values) - len(finite)} of {len(values)} diverged"
        return f"{statistics.fmean(finite):.3f} ± {statistics.stdev(finite) if len(finite) > 1 else 0.0:.3f}"

    rows = []
    for norm in ("post", "pre"):
        for lr in lrs:
            for warmup in (0.0, 0.1):
                rs = group(norm, lr, warmup)
                rows.append(
                    [
                        f"{norm}-LN",
                        f"{lr:g}",
                        f"{warmup:.0%}",
                        mean_sd([r["curve"][0][1] for r in rs]),
                        mean_sd([r["final_val"] for r in rs]),
                        mean_sd([r["best_val"] for r in rs]),
                        ", ".join(str(plateau_steps(r)) for r in rs),
                        f"{statistics.fmean(r['seconds'] for r in rs):.0f}",
                    ]
                )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMAGES.mkdir(parents=True, exist_ok=True)
    plot = IMAGES / "init_warmup.png"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, sharey=True)
    colors = {(lrs[0], 0.0): "C0", (lrs[0], 0.1): "C1", (lrs[-1], 0.0): "C3", (lrs[-1], 0.1): "C2"}
    for ax, norm in zip(axes, ("post", "pre"), strict=True):
        for lr in lrs:
            for warmup in (0.0, 0.1):
                for k, r in enumerate(group(norm, lr, warmup)):
                    xs, ys = zip(*r["curve"], strict=True)
                    ax.plot(
                        xs, ys, color=colors.get((lr, warmup)), alpha=0.8, linewidth=1.2,
                        linestyle="-" if warmup else "--",
                        label=f"lr {lr:g}, warmup {warmup:.0%}" if k == 0 else None,
                    )  # fmt: skip
        ax.set_title(f"{norm}-LN, {args.layers} blocks, d_model {args.d_model}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss (nats per char)")
    save_figure(fig, plot)

    def verdict(norm, lr):
        no = [r["final_val"] for r in group(norm, lr, 0.0)]
        wu = [r["final_val"] for r in group(norm, lr, 0.1)]
        if not all(math.isfinite(v) for v in no + wu):
            return f"{norm}-LN at lr {lr:g}: a run diverged (non-finite loss)"
        d = statistics.fmean(no) - statistics.fmean(wu)
        return (
            f"{norm}-LN at lr {lr:g}: final held-out loss without warmup minus with warmup = {d:+.3f} nats "
            f"(without {statistics.fmean(no):.3f}, with {statistics.fmean(wu):.3f}; {args.seeds}-seed means)"
        )

    notes = [verdict(n, lr) for n in ("post", "pre") for lr in lrs]
    notes.append(
        f"Unigram plateau: a model that predicts each character by its training frequency alone scores "
        f"{unigram:.3f} nats on the held-out batches. 'Steps on the unigram plateau' counts the evaluations "
        f"(every {args.eval_every} steps) whose held-out loss is within {PLATEAU_TOL} nats of it, times "
        f"{args.eval_every}: the model has learnt the character frequencies and nothing of the context."
    )
    notes.append(
        f"Sizes: {args.layers} blocks, d_model {args.d_model}, {args.heads} heads, context {args.ctx}, batch "
        f"{args.batch}, {args.steps} steps, held-out loss on {args.eval_batches} fixed batches every "
        f"{args.eval_every} steps; one thread; {len(runs)} runs took {total / 60:.1f} min wall-clock on a "
        "2-core machine shared with other jobs (the 's per run' column is wall-clock too)"
        + (f", {sum(cpu) / 60:.1f} CPU-minutes of process time." if len(cpu) == len(runs) else ".")
    )
    return {
        "name": "init_warmup",
        **{
            "title": "Warmup: 12-layer Post-LN vs Pre-LN char transformers on Tiny Shakespeare",
            "claim": "Without learning-rate warmup a deep Post-LN transformer diverges or stalls at an lr where it "
            "trains with warmup; Pre-LN trains without warmup (Xiong et al. 2020; Liu et al. 2020).",
            "tables": [
                {
                    "caption": f"Held-out loss (nats per character; mean ± sd over {args.seeds} seeds). Uniform guessing "
                    f"over the {vocab} characters is ln {vocab} = {math.log(vocab):.3f}.",
                    "columns": [
                        "norm",
                        "lr",
                        "warmup",
                        "at init",
                        "final",
                        "best on the way",
                        "steps on the unigram plateau (each seed)",
                        "s per run",
                    ],  # fmt: skip
                    "rows": rows,
                }
            ],
            "plots": [str(plot.relative_to(ROOT))],
            "notes": notes,
            "raw": {"args": vars(args), "runs": runs},
        },
    }


def report(result: dict[str, Any]) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` (with the machine and the command)."""
    write_result(result["name"], result)


def main() -> None:
    report(run())


if __name__ == "__main__":
    main()
