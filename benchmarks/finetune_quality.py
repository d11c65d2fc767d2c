"""finetune_quality: head vs LoRA vs full fine-tuning on all-MiniLM-L6-v2 + SST-2.

Protocol (the harness's defaults): bundled SST-2 sample (4,000 train rows), GLUE dev as test (872
rows), the same seeds, data order, step budget and linear warmup/decay for every method, each at its
default learning rate. Every run is a child process (``gradkit compare``), so peak memory is its own.

    python -m benchmarks.finetune_quality                 # 300 steps of batch 32, seeds 0 1 2
    python -m benchmarks.finetune_quality --steps 50 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import IMAGES, ROOT, finished_run, save_figure, write_result


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot(curves: dict[str, list[list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradkit.train.plots import smooth

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (name, runs) in enumerate(curves.items()):
        smoothed = [smooth(run) for run in runs]
        steps = range(1, min(len(r) for r in smoothed) + 1)
        lo = [min(r[s - 1] for r in smoothed) for s in steps]
        hi = [max(r[s - 1] for r in smoothed) for s in steps]
        mid = [statistics.mean(r[s - 1] for r in smoothed) for s in steps]
        ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
        ax.plot(steps, mid, color=f"C{i}", linewidth=1.8, label=f"{name} (mean of {len(runs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (smoothed; band = min..max over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="head,lora,full")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train", help="training file (default: the bundled 4,000-row SST-2 sample)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "finetune_quality"))
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the result's notes (how it ran)"
    )
    parser.add_argument("--name", default="finetune_quality")
    parser.add_argument(
        "--ema",
        type=float,
        default=0.99,
        help="also evaluate a weight EMA of this decay (it never changes training); 0 disables",
    )
    args = parser.parse_args(argv)

    from gradkit.train.compare import compare
    from gradkit.train.config import TrainConfig
    from gradkit.train.metrics import window_mean

    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    curves: dict[str, list[list[float]]] = {m: [] for m in methods}
    for seed in seeds:
        out = Path(args.out) / f"seed{seed}"
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seed=seed,
            out=str(out),
            ema=args.ema or None,
            train=args.train,
        )
        for method in methods:
            # a folder that finished_run did not take is a run that was stopped: start it again
            summary = (
                finished_run(out / method, cfg)
                or compare(dataclasses.replace(cfg, overwrite=True), [method], keep_existing=True)[0]
            )
            if "error" in summary:
                raise SystemExit(f"{summary['method']} failed at seed {seed}: {summary['error']}")
            runs[summary["method"]].append(summary)
            metrics = (out / summary["method"] / "metrics.jsonl").read_text().splitlines()
            curves[summary["method"]].append([json.loads(line)["loss"] for line in metrics])

    checkpoints = sorted({s for s in (50, 100, 300, args.steps) if s <= args.steps})
    columns = [
        "method",
        "lr",
        *[f"train loss @{s}" for s in checkpoints],
        "test accuracy % (mean ± sd)",
        "test accuracy % per seed",
        *(
            [f"EMA {args.ema:g} test accuracy % (mean ± sd)", "EMA test accuracy % per seed"]
            if args.ema
            else []
        ),
        "s/step",
        "peak RSS MiB",
        "trainable params",
        "optimiser state MiB",
    ]
    rows = []
    for method, summaries in runs.items():
        rows.append(
            [
                method,
                f"{summaries[0]['lr']:g}",
                *[mean_sd([window_mean(curve, c) for curve in curves[method]]) for c in checkpoints],
                mean_sd([s["test_accuracy"] for s in summaries], 100, 2),
                ", ".join(f"{100 * s['test_accuracy']:.2f}" for s in summaries),
                *(
                    [
                        mean_sd([s["ema"]["test_accuracy"] for s in summaries], 100, 2),
                        ", ".join(f"{100 * s['ema']['test_accuracy']:.2f}" for s in summaries),
                    ]
                    if args.ema
                    else []
                ),
                mean_sd([s["seconds_per_step"] for s in summaries], digits=3),
                f"{max(s['peak_memory_mb'] for s in summaries):.0f}",
                f"{summaries[0]['trainable_parameters']:,}",
                f"{summaries[0]['optimizer_state_bytes'] / 2**20:.2f}",
            ]
        )
    verdicts = []
    for method in ("full", "lora"):
        if method in runs:
            accs = [100 * s["test_accuracy"] for s in runs[method]]
            reached = sum(a >= 85 for a in accs)
            verdicts.append(
                f"{method}: {reached} of {len(accs)} seeds at or above 85% test accuracy "
                f"(mean {statistics.mean(accs):.2f}%, lowest {min(accs):.2f}%); goal "
                f"{'met' if reached == len(accs) else 'not met'} at this budget."
            )
    plot_path = IMAGES / f"{args.name}.png"
    plot(curves, plot_path, f"MiniLM-L6 on SST-2: {args.steps} steps of batch {args.batch_size}")
    return {
        "name": args.name,
        **{
            "title": f"Fine-tuning quality: {' vs '.join(methods)}, raw and EMA weights, {args.steps} steps "
            "(all-MiniLM-L6-v2, SST-2)",
            "claim": "LoRA and full fine-tuning reach at least 85% SST-2 test accuracy within the budget the README "
            "documents (600 steps of batch 32 on the full SST-2 training set); the 300-step default on the bundled "
            "4,000-row sample is the quick comparison.",
            "tables": [
                {
                    "caption": f"{args.steps} steps of batch {args.batch_size}, seeds {args.seeds}, trained on "
                    f"{args.train or 'the bundled 4,000-row SST-2 sample'}; train loss is the mean "
                    "of the 10 steps ending at that step (mean ± sd over seeds); test = GLUE SST-2 dev (872).",
                    "columns": columns,
                    "rows": rows,
                }
            ],
            "plots": [str(plot_path.relative_to(ROOT))],
            "notes": [
                *verdicts,
                "Each method at its default learning rate (head 2e-3, LoRA 1e-3 with r=8, alpha=16 on every encoder "
                "Linear, full 5e-5), AdamW, weight decay 0.01, 10% linear warmup then linear decay, grad-norm clip 1.0, "
                "max length 128, mean pooling.",
                "Peak RSS is the child process's maximum resident set size, model loading included.",
                *args.note,
                *(
                    [
                        f"EMA: gradkit.EMA(decay={args.ema:g}, warmup='bias_corrected') updated after every optimiser step "
                        "of the same runs; it never changes training, so the raw and EMA columns come from one trajectory. "
                        "s/step includes the EMA update."
                    ]
                    if args.ema
                    else []
                ),
            ],
            "raw": {
                m: [{k: v for k, v in s.items() if k != "out"} for s in summaries]
                for m, summaries in runs.items()
            },
        },
    }


def report(result: dict[str, Any]) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` (with the machine and the command)."""
    write_result(result["name"], result)


def main() -> None:
    report(run())


if __name__ == "__main__":
    main()
