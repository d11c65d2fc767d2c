"""lora_quality: LoRA variants against full fine-tuning on all-MiniLM-L6-v2 + SST-2, each at its best
learning rate.

Protocol (the finetune_quality harness, shorter budget): the bundled SST-2 sample, GLUE dev as test,
the same data order, 10% linear warmup then linear decay, AdamW-style weight decay 0.01, grad clip 1.0,
r = 8, alpha = 16 on every encoder Linear. For every method a learning-rate sweep on seed 0; the
learning rate with the lowest mean train loss over the whole run is kept and run on the other seeds.
Reported per method at its best learning rate: the mean train loss over steps 1..N, the train loss at
N (mean of the last 10 steps), test accuracy, each as mean ± sd over seeds, and the gaps to full
fine-tuning. Each run is a child process (``gradkit compare``).

Methods are harness names, optionally with options: ``lora-pro:pro_moments=factor``. Runs are kept
under ``--out``; a rerun reuses every finished run with the same settings (so an interrupted benchmark
resumes where it stopped).

    python -m benchmarks.lora_quality                               # 100 steps, seeds 0 1 2
    python -m benchmarks.lora_quality --methods lora,lora-ga --steps 30 --seeds 0 --name smoke

Re-measuring some methods after a change (``--merge`` keeps the other methods' rows of the existing
result file, carried over as they were; ``--grid`` narrows a method's sweep around its known best):

    python -m benchmarks.lora_quality --methods lora-pro --grid lora-pro=8e-4,1.6e-3,3.2e-3 --merge
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import IMAGES, RESULTS, ROOT, finished_run, write_result
from benchmarks.finetune_quality import mean_sd, plot

# learning-rate grids: around each method's default, a factor 2 apart unless said
GRIDS = {
    "full": (2e-5, 5e-5, 1e-4, 2e-4, 4e-4),
    "lora": (5e-4, 1e-3, 2e-3, 4e-3),
    "lora-plus": (2.5e-4, 5e-4, 1e-3),
    "lora-pro": (5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3),
    # from the projected form's scale down (each run of the full moments costs more than a LoRA run)
    "lora-pro:pro_moments=full": (2e-4, 4e-4, 8e-4, 1.6e-3),
    # wider: where its best lr lies (LoRA's or full FT's scale) is the question
    "lora-ga": (5e-5, 2e-4, 4e-4, 8e-4, 1.6e-3),
    # the same init up to the sketch's few per cent: at 8e-4, where lora-ga has a finished run for every
    # seed (its best lr when this ran; 4e-4 since), so the two compare run by run
    "lora-ga:ga_estimator=sketch": (8e-4,),
    "lora-ga-pro": (4e-4, 8e-4, 1.6e-3, 3.2e-3),
    "peft-lora-ga": (5e-4, 1e-3, 2e-3),  # its B holds the (small) singular values: LoRA's scale
}
# in order of interest: the result file is rewritten after every method, so a cut-short run still reports
DEFAULT_METHODS = (
    "full,lora,lora-ga,lora-pro,peft-lora-ga,lora-ga-pro,lora-plus,lora-pro:pro_moments=full,"
    "lora-ga:ga_estimator=sketch"
)


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``"lora-pro:pro_moments=factor"`` -> (label, method name, options)."""
    name, _, rest = spec.partition(":")
    options = dict(item.split("=", 1) for item in rest.split(";") if item) if rest else {}
    return spec, name, options


class NotRun(Exception):
    """A run that ``--report-only`` would have had to start."""


def train_one(
    cfg, label: str, name: str, options: dict, lr: float, seed: int, out: Path, report_only: bool
) -> dict:
    """One harness run of method ``name`` at ``lr`` and ``seed`` in ``out`` (a finished one is reused): its
    summary, with its per-step losses and their mean."""
    import dataclasses

    from gradkit.train.compare import compare

    run_cfg = dataclasses.replace(cfg, lr=lr, seed=seed, out=str(out), options={**cfg.options, **options})
    summary = finished_run(out / name, run_cfg)
    if summary is not None:
        summary["reused"] = True
    elif report_only:
        raise NotRun(label)
    else:
        # a folder that finished_run did not take is a run that was stopped: start it again
        summary = compare(dataclasses.replace(run_cfg, overwrite=True), [name], keep_existing=True)[0]
    if "error" in summary:
        raise SystemExit(f"{label} failed at lr {lr:g}, seed {seed}: {summary['error']}")
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    summary["losses"] = [json.loads(line)["loss"] for line in lines]
    summary["mean_loss"] = statistics.mean(summary["losses"])
    return summary


def measure(args, spec: str, base, seeds: list[int]) -> tuple[dict[float, dict], list[dict]]:
    """One method: its learning-rate sweep on the first seed, then its best lr on the other seeds."""
    label, name, options = parse_method(spec)
    tag = label.replace(":", "-").replace("=", "-").replace(";", "-")
    sweep = {}
    for lr in args.grid.get(label) or GRIDS.get(label, GRIDS[name]):
        out = Path(args.out) / tag / f"lr{lr:g}-seed{seeds[0]}"
        sweep[lr] = train_one(base, label, name, options, lr, seeds[0], out, args.report_only)
    lr_best = min(sweep, key=lambda lr: sweep[lr]["mean_loss"])
    best = [sweep[lr_best]]
    for seed in seeds[1:]:
        out = Path(args.out) / tag / f"lr{lr_best:g}-seed{seed}"
        best.append(train_one(base, label, name, options, lr_best, seed, out, args.report_only))
    return sweep, best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--grid`` parsed into {method: learning rates}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "lora_quality"))
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the result's notes (how it ran)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="start no run: report the methods whose runs are all finished",
    )
    parser.add_argument("--name", default="lora_quality")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of methods not measured now from the existing result file (as they were)",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="METHOD=LR,LR,...",
        help="this invocation's learning-rate grid for one method (e.g. a re-run around its best lr)",
    )
    args = parser.parse_args(argv)
    args.grid = {
        spec.rpartition("=")[0]: tuple(float(lr) for lr in spec.rpartition("=")[2].split(","))
        for spec in args.grid
    }
    return args


def run(
    args: argparse.Namespace, partial: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any] | None:
    """Measure each method of ``--methods``; returns the result (``name`` and the fields of
    ``benchmarks/results/<name>.json``), or None when no method's runs were all there (``--report-only``).
    The measuring takes hours: ``partial`` is given the result so far after each method before the last,
    so that a cut-short invocation still leaves one."""
    from gradkit.train.config import TrainConfig

    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = TrainConfig(steps=args.steps, batch_size=args.batch_size)
    sweeps: dict[str, dict[float, dict]] = {}
    best: dict[str, list[dict]] = {}
    planned = args.methods.split(",")
    matched: dict[str, list[str]] = {}
    previous = load_previous(args, planned) if args.merge else None
    result = None
    for i, spec in enumerate(planned):
        try:
            sweeps[spec], best[spec] = measure(args, spec, base, seeds)
        except NotRun:
            continue
        matched[spec] = against_plain(args, spec, base, best[spec])
        result = build_result(args, seeds, sweeps, best, started, planned, matched, previous)
        if partial is not None and i < len(planned) - 1:
            partial(result)
    return result


def load_previous(args, planned: list[str]) -> dict | None:
    """The existing result file's methods that this invocation does not measure: their best-lr runs
    (``raw``), sweeps, run-by-run notes and row order, to carry over unchanged (``--merge``)."""
    path = RESULTS / f"{args.name}.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    carried = [label for label in old["raw"] if label not in planned]
    return {
        "order": [row[0] for row in old["tables"][0]["rows"]],
        "best": {label: old["raw"][label] for label in carried},
        "sweeps": {
            label: {float(lr): {"mean_loss": v} for lr, v in old["sweeps"][label].items()}
            for label in carried
        },
        # run-by-run comparisons whose variant and plain method both keep their old runs
        "matched": [
            n
            for n in old["notes"]
            if any(
                n.startswith(f"{label} against ") and parse_method(label)[1] not in planned
                for label in carried
            )
        ],
        "plots": old.get("plots", []),
        # a file that is itself a merge keeps the date its carried rows were measured on
        "date": next(
            (
                n.split("(measured ", 1)[1].split(")", 1)[0]
                for n in old["notes"]
                if n.startswith("Rows carried over")
            ),
            old.get("machine", {}).get("date", "?"),
        ),
    }


def against_plain(args, spec: str, base, runs: list[dict]) -> list[str]:
    """A variant (``name:option=value``) against its plain method's finished runs at the same lr and
    seeds, run by run (nothing is started for this): the variant's effect without the seed noise."""
    label, name, options = parse_method(spec)
    if not options:
        return []
    pairs = []
    for variant in runs:
        out = Path(args.out) / name / f"lr{variant['lr']:g}-seed{variant['seed']}"
        try:
            plain = train_one(base, name, name, {}, variant["lr"], variant["seed"], out, report_only=True)
        except NotRun:
            continue
        pairs.append((variant, plain))
    if not pairs:
        return []
    loss = [v["mean_loss"] - p["mean_loss"] for v, p in pairs]
    acc = [100 * (v["test_accuracy"] - p["test_accuracy"]) for v, p in pairs]
    return [
        f"{label} against {name} at the same lr and seeds (seeds {', '.join(str(v['seed']) for v, _ in pairs)}, "
        f"lr {pairs[0][0]['lr']:g}): mean train loss differences {', '.join(f'{d:+.4f}' for d in loss)}, "
        f"test accuracy differences {', '.join(f'{d:+.2f}' for d in acc)} points."
    ]


def build_result(args, seeds, sweeps, best, started, planned, matched, previous=None) -> dict[str, Any]:
    """The result of the methods measured so far (``best``), with the carried-over ones of ``previous``
    (``--merge``) in their old order; draws its plot."""
    measured = list(best)
    if previous:  # carried-over rows in the old order, re-measured ones in their old place
        order = [*previous["order"], *(m for m in measured if m not in previous["order"])]
        merged = {**previous["best"], **best}
        best = {label: merged[label] for label in order if label in merged}
        sweeps = {label: {**previous["sweeps"], **sweeps}[label] for label in best}

    def avg(label: str, key: str) -> float:
        return statistics.mean(s[key] if key != "final" else s["final_train_loss"] for s in best[label])

    n = args.steps
    columns = [
        "method",
        "lr sweep (seed 0: mean train loss 1..N)",
        "best lr",
        f"mean train loss 1..{n}",
        f"train loss @{n}",
        "test accuracy % (mean ± sd)",
        "test accuracy % per seed",
        "s/step",
    ]
    rows = []
    for label, runs in best.items():
        sweep = ", ".join(f"{lr:g}: {s['mean_loss']:.4f}" for lr, s in sweeps[label].items())
        rows.append(
            [
                label,
                sweep,
                f"{runs[0]['lr']:g}",
                mean_sd([s["mean_loss"] for s in runs], digits=4),
                mean_sd([s["final_train_loss"] for s in runs], digits=4),
                mean_sd([s["test_accuracy"] for s in runs], 100, 2),
                ", ".join(f"{100 * s['test_accuracy']:.2f}" for s in runs),
                mean_sd([s["seconds_per_step"] for s in runs], digits=3),
            ]
        )

    all_runs = [
        *(s for label in measured for s in sweeps[label].values()),
        *(s for label in measured for s in best[label][1:]),
    ]
    notes = []
    if "full" in best and "lora" in best:
        full_mean, lora_mean = avg("full", "mean_loss"), avg("lora", "mean_loss")
        full_end, lora_end = avg("full", "final"), avg("lora", "final")
        lora_acc = avg("lora", "test_accuracy")
        gap = lora_mean - full_mean
        # the seeds' spread: a gap inside it has no sign to close, and a share of it would be noise
        spread = (
            max(statistics.stdev(s["mean_loss"] for s in best[m]) for m in ("full", "lora"))
            if len(seeds) > 1
            else 0.0
        )
        notes.append(
            f"Mean train loss over steps 1..{n}: full {full_mean:.4f}, LoRA {lora_mean:.4f}; LoRA's gap to full is "
            f"{gap:+.4f}"
            + (
                f", inside the seed-to-seed sd ({spread:.4f}): at their best learning rates LoRA trains as fast as "
                "full fine-tuning here, so 'the share of the gap closed' is not measurable."
                if abs(gap) <= spread
                else "."
            )
        )
        for label in best:
            if label in ("full", "lora"):
                continue
            mean = avg(label, "mean_loss")
            closed = (
                f"closes {100 * (lora_mean - mean) / gap:.0f}% of LoRA's gap; " if abs(gap) > spread else ""
            )
            notes.append(
                f"{label}: mean train loss 1..{n} {mean:.4f} ({mean - lora_mean:+.4f} vs LoRA, {mean - full_mean:+.4f} "
                f"vs full; {closed}sd over seeds {statistics.stdev(s['mean_loss'] for s in best[label]) if len(seeds) > 1 else 0:.4f}); "
                f"|train loss @{n} - full's| = {abs(avg(label, 'final') - full_end):.4f} (LoRA's: {abs(lora_end - full_end):.4f}); "
                f"test accuracy {100 * avg(label, 'test_accuracy'):.2f}% vs LoRA's {100 * lora_acc:.2f}%."
            )
    plot_path = IMAGES / (f"{args.name}_rerun.png" if previous else f"{args.name}.png")
    plot(
        {label: [s["losses"] for s in best[label]] for label in measured},
        plot_path,
        f"MiniLM-L6 on SST-2, {n} steps of batch {args.batch_size}, each method at its best lr"
        + (" (re-run)" if previous else ""),
    )
    old_plots = [p for p in previous["plots"] if p != str(plot_path.relative_to(ROOT))] if previous else []
    carried_note = (
        [
            f"Rows carried over unchanged from the previous result (measured {previous['date']}): "
            f"{', '.join(m for m in best if m not in measured)}; re-measured by this invocation: "
            f"{', '.join(measured)} ({plot_path.name} shows only those; the first plot is the previous one)."
        ]
        if previous
        else []
    )
    return {
        "name": args.name,
        **{
            "title": "LoRA variants vs full fine-tuning at their best learning rates (all-MiniLM-L6-v2, SST-2)",
            "claim": "LoRA-GA and LoRA-Pro bring LoRA's training closer to full fine-tuning's than plain LoRA; "
            "LoRA-GA closes at least half of LoRA's gap on the mean train loss over the run.",
            "tables": [
                {
                    "caption": f"{n} steps of batch {args.batch_size}; learning rate swept on seed {seeds[0]} (lowest mean "
                    f"train loss kept), then seeds {args.seeds}; test = GLUE SST-2 dev (872).",
                    "columns": columns,
                    "rows": rows,
                }
            ],
            "plots": [*old_plots, str(plot_path.relative_to(ROOT))],
            "notes": [
                *notes,
                *(line for lines in matched.values() for line in lines),
                *(previous["matched"] if previous else []),
                *carried_note,
                *args.note,
                "r = 8, alpha = 16 on all 36 encoder Linear layers; lora-plus: PEFT's create_loraplus_optimizer, ratio 16; "
                "lora-pro: gradkit.LoRAPro AdamW (projected moments unless named), X = sylvester; lora-ga: gradkit's "
                "LoRA-GA init on the first 8 training batches (the harness defaults); peft-lora-ga: PEFT's "
                "preprocess_loraga + init_lora_weights='lora_ga' on the same 8 batches; lora-ga-pro: both.",
                f"{len(all_runs)} runs{' of the re-measured methods' if previous else ''} "
                f"({sum(bool(s.get('reused')) for s in all_runs)} of them finished by an earlier invocation and reused); "
                f"this invocation took {(time.perf_counter() - started) / 60:.0f} min.",
                *(
                    [
                        f"Not measured (their runs were not finished when this was written): {', '.join(m for m in planned if m not in best)}."
                    ]
                    if len(best) < len(planned)
                    else []
                ),
            ],
            "raw": {
                label: [{k: v for k, v in s.items() if k not in ("out", "losses", "reused")} for s in runs]
                for label, runs in best.items()
            },
            "sweeps": {
                label: {f"{lr:g}": s["mean_loss"] for lr, s in sw.items()} for label, sw in sweeps.items()
            },
        },
    }


def report(result: dict[str, Any] | None, args: argparse.Namespace) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` (with the machine and the command); None
    writes nothing."""
    if result is not None:
        write_result(result["name"], result)


def main() -> None:
    args = parse_args()
    report(run(args, partial=lambda result: report(result, args)), args)


if __name__ == "__main__":
    main()
