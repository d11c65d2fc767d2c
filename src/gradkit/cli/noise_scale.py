"""``gradkit noise-scale``: train for a while, measure ``B_simple``, and turn it into batch-size advice.

It runs the harness' training loop (:func:`gradkit.train.loop.finetune`: same data order, seeding,
checks and run folder as ``gradkit finetune``) on its classifier (a local Hugging Face encoder with a
head, the bundled SST-2 sample by default) with :class:`~gradkit.train.methods.NoiseScaleProbe` as the
method: each step's
batch is split into micro-batches (gradient accumulation), the gradient noise scale is measured from
them (:class:`gradkit.NoiseScale`), and the lr is constant. The run folder holds ``config.json``,
``labels.json``, ``metrics.jsonl`` (loss and ``B_simple`` per step), ``summary.json`` (the final
``B_simple`` and the learning-rate table), ``loss.png``, ``noise_scale.png``, ``lr_vs_batch.png`` and
``steps_examples.png``. Torch and transformers are imported only when the run starts.

``--branch 16,32,64,128`` also measures the critical batch directly at the run's end
(:mod:`gradkit.train.branches`): one short run per batch size from the run's weights and optimiser
state, each at its lr from the optimiser's law, until the held-out loss is ``--branch-drop`` lower;
Zhang et al.'s 20% rule on the steps they took. ``summary.json`` gains ``branches`` and the folder
``branches.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from gradkit.cli.options import add_settings, values_of
from gradkit.errors import GradkitError
from gradkit.files import atomic_path, write_json
from gradkit.scaling.laws import lr_for_batch
from gradkit.train.config import TrainConfig
from gradkit.train.method_options import NoiseScaleOptions
from gradkit.train.settings import check_values, settings_from

TABLE_BATCHES = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]

# the run's settings shared with gradkit finetune (declared in TrainConfig), and this command's defaults
SHARED = ("model", "train", "text_col", "label_col", "max_length", "steps", "batch_size", "lr", "seed")
SHARED += ("out", "overwrite", "dev", "dev_fraction", "head_init", "label_text", "label_template")
DEFAULTS = {"max_length": 64, "steps": 100, "lr": 5e-5}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``gradkit noise-scale`` options: the shared model, data and budget settings, and the
    measurement's own (:class:`~gradkit.train.method_options.NoiseScaleOptions`)."""
    add_settings(p, TrainConfig, names=SHARED, defaults=DEFAULTS)
    add_settings(p, NoiseScaleOptions, title=NoiseScaleOptions.title)


def _check(args: argparse.Namespace) -> NoiseScaleOptions:
    """Every setting against its declared range, the batch against the micro-batches, and the branch
    plan against the budget and the dev set."""
    check_values(TrainConfig, vars(args))
    options = settings_from(NoiseScaleOptions, vars(args))
    if args.batch_size < options.micro_batches or args.batch_size % options.micro_batches:
        raise GradkitError(
            f"--batch-size {args.batch_size} must be a multiple of --micro-batches {options.micro_batches}; "
            "e.g. --batch-size 32 --micro-batches 4"
        )
    if options.branch is not None:
        branch_sizes(options)
        if args.dev is None and args.dev_fraction is None:
            raise GradkitError(
                "--branch needs held-out data to judge the branches; pass --dev-fraction 0.1 or --dev FILE"
            )
    elif any(getattr(options, name) != getattr(NoiseScaleOptions(), name) for name in BRANCH_SETTINGS):
        raise GradkitError(
            "--branch-drop, --branch-examples and --branch-eval-examples act only with --branch 16,32,64"
        )
    return options


BRANCH_SETTINGS = ("branch_drop", "branch_examples", "branch_eval_examples")


def branch_sizes(options: NoiseScaleOptions) -> tuple[int, ...]:
    """The batch sizes of ``--branch``, smallest first: at least two distinct whole numbers >= 1, each
    able to take one step within ``--branch-examples``."""
    text = options.branch or ""
    try:
        sizes = sorted({int(item) for item in text.split(",")})
    except ValueError:
        sizes = []
    if len(sizes) < 2 or sizes[0] < 1:
        raise GradkitError(
            f"--branch {text!r} must list at least two different batch sizes >= 1, e.g. --branch 16,32,64,128"
        )
    if sizes[-1] > options.branch_examples:
        raise GradkitError(
            f"--branch size {sizes[-1]} exceeds --branch-examples {options.branch_examples}: that branch could "
            f"not take one step; raise --branch-examples to at least {sizes[-1]}"
        )
    return tuple(sizes)


def advice_table(
    b_simple: float, batch: int, lr: float, batches: list[int] = TABLE_BATCHES
) -> list[dict[str, float]]:
    """Suggested learning rates and predicted costs per batch size, from one known-good (batch, lr).

    SGD: McCandlish et al. (2018) with ``B_noise ≈ B_simple``. Adam: Li et al. (2024) mean-field sign
    rule with ``κ² ≈ B_simple`` and the peak at ``B_simple``. Steps and examples relative to their
    minima: ``S/S_min = 1 + B_simple/B``, ``E/E_min = 1 + B/B_simple`` (``B_crit ≈ B_simple``).
    """
    rows = []
    for b in batches:
        rows.append(
            {
                "batch": b,
                "sgd_lr": lr_for_batch(lr, batch, b, optimizer="sgd", b_noise=b_simple),
                "adam_lr": lr_for_batch(
                    lr, batch, b, optimizer="adam", kappa=math.sqrt(b_simple), b_noise=b_simple
                ),
                "steps_over_min": 1.0 + b_simple / b,
                "examples_over_min": 1.0 + b / b_simple,
            }
        )
    return rows


def _plots(
    out: Path, steps: list[int], values: list[float | None], b_simple: float | None, args
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    pts = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), color="C0", linewidth=1.6, label="B_simple (smoothed)")
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple = tr(Σ)/|G|²")
    ax.set_title("gradient noise scale during training (gaps: not yet measurable)")
    ax.grid(alpha=0.3)
    ax.legend() if pts else None
    save(fig, "noise_scale.png")
    if b_simple is None:
        return written

    rows = advice_table(b_simple, args.batch_size, args.lr, [2**i for i in range(0, 15)])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([r["batch"] for r in rows], [r["sgd_lr"] for r in rows], "o-", label="SGD (McCandlish et al.)")
    ax.plot([r["batch"] for r in rows], [r["adam_lr"] for r in rows], "s-", label="Adam (Li et al., surge)")
    ax.axvline(b_simple, color="grey", linestyle=":", label=f"B_simple = {b_simple:.3g}")
    ax.plot([args.batch_size], [args.lr], "k*", markersize=12, label="known-good (batch, lr)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("suggested learning rate η*(B)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save(fig, "lr_vs_batch.png")

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    bs = [b_simple * 2.0**k for k in [i / 8 for i in range(-80, 81)]]
    ax.plot([1 + b / b_simple for b in bs], [1 + b_simple / b for b in bs], color="C2")
    for b in TABLE_BATCHES:
        ax.plot(1 + b / b_simple, 1 + b_simple / b, "o", color="C3")
        ax.annotate(
            str(b),
            (1 + b / b_simple, 1 + b_simple / b),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples E / E_min")
    ax.set_ylabel("steps S / S_min")
    ax.set_title(f"(S/S_min − 1)(E/E_min − 1) = 1, B_crit ≈ {b_simple:.3g}")
    ax.grid(alpha=0.3, which="both")
    save(fig, "steps_examples.png")
    return written


def run_noise_scale(args: argparse.Namespace, *, progress: bool = True) -> dict[str, Any]:
    """Run ``gradkit noise-scale`` with parsed ``args`` through the harness' training loop
    (:func:`gradkit.train.loop.finetune` with :class:`~gradkit.train.methods.NoiseScaleProbe`); prints the table and returns
    the summary."""
    options = _check(args)
    # the harness loads torch: not for --help
    from gradkit.train.branches import Branches, BranchPlan
    from gradkit.train.loop import finetune
    from gradkit.train.methods import NoiseScaleProbe

    settings = values_of(args, TrainConfig)
    settings.update(
        method=NoiseScaleProbe.name,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=None,
        out=args.out or str(Path("runs") / f"noise-scale-{time.strftime('%Y%m%d-%H%M%S')}"),
        schedule="constant",
        evaluate=False,
        options=dataclasses.asdict(options),
    )
    probe = NoiseScaleProbe(options)
    branches: dict[str, Any] = {}

    def branch(run) -> None:
        probe.close()  # the measurement ends with the run: the branches' gradients are not part of it
        if probe.gns.b_simple is None:
            raise GradkitError(
                f"B_simple is not measurable after {args.steps} steps ({probe.gns.status}), so the branches "
                "have no learning-rate law; run more --steps"
            )
        plan = BranchPlan(
            branch_sizes(options),
            options.branch_drop,
            options.branch_examples,
            options.branch_eval_examples,
            options.probe_optimizer,
        )
        branches.update(Branches(run, plan, probe.gns.b_simple).measure(progress=progress))

    try:
        harness_summary = finetune(
            TrainConfig(**settings),
            progress=progress,
            method=probe,
            after_train=branch if options.branch is not None else None,
        )
    finally:
        probe.close()
    gns = probe.gns
    out = Path(harness_summary["out"])
    steps, values = [], []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "b_simple" in row:  # a step's row (a dev set adds its evaluation's)
            steps.append(row["step"])
            values.append(row["b_simple"])

    b_simple = gns.b_simple
    summary: dict[str, Any] = {
        **{k: v for k, v in harness_summary.items() if k != "out"},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        **gns.metrics(),
    }
    summary["status"] = gns.status
    if b_simple is not None:
        summary["table"] = advice_table(b_simple, args.batch_size, args.lr)
    summary["plots"] = _plots(out, steps, values, b_simple, args)
    if branches:
        summary["branches"] = branches
        summary["plots"].append(_branch_plot(out, branches))
    write_json(out / "summary.json", summary)
    if b_simple is None:
        print(f"B_simple after {args.steps} steps: {gns.status}. Run folder {out}")
    else:
        print(
            f"B_simple = {b_simple:.4g} after {args.steps} steps (tr(Σ) = {gns.trace_sigma:.4g}, |G|² = {gns.grad_sq_norm:.4g})"
        )
        print(f"suggested learning rates from the known-good lr {args.lr:g} at batch {args.batch_size}:")
        print(f"{'batch':>6} {'SGD lr':>11} {'Adam lr':>11} {'S/S_min':>8} {'E/E_min':>8}")
        for r in summary["table"]:
            print(
                f"{r['batch']:>6} {r['sgd_lr']:>11.4g} {r['adam_lr']:>11.4g} "
                f"{r['steps_over_min']:>8.3g} {r['examples_over_min']:>8.3g}"
            )
        print(
            f"SGD: lr·(1+B_s/B)/(1+B_s/B'); Adam: sign-descent surge with κ²≈B_s and the peak at B_s. Run folder {out}"
        )
    if branches:
        _print_branches(branches)
    summary["out"] = str(out)
    return summary


def _print_branches(record: dict[str, Any]) -> None:
    """The branches' steps and overheads, and the critical batch beside the noise scales."""
    print(
        f"branches from step {record['step']} (held-out loss {record['held_out_loss']:.4g}, target "
        f"{record['target']:.4g}):"
    )
    print(f"{'batch':>6} {'lr':>11} {'steps':>8} {'r(B)':>7}")
    for b, lr, s, r in zip(record["batches"], record["lr"], record["steps"], record["overhead"], strict=True):
        print(
            f"{b:>6} {lr:>11.4g} {'-' if s is None else f'{s:.1f}':>8} {'-' if r is None else f'{r:.3g}':>7}"
        )
    b_noise = "not positive" if record["b_noise"] is None else f"{record['b_noise']:.4g}"
    print(
        f"critical batch (20% rule): {record['critical_text']}; B_simple {record['b_simple']:.4g}, "
        f"B_noise (Hessian) {b_noise}"
    )


def _branch_plot(out: Path, record: dict[str, Any]) -> str:
    """branches.png: each branch's held-out loss against examples, with the target; and the
    overhead over linear scaling against the batch, with the 20% line, B_simple and the result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, overhead) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    for i, b in enumerate(record["batches"]):
        points = record["curves"][str(b)]
        curves.plot(
            [s * b for s, _ in points], [loss for _, loss in points], "o-", color=f"C{i}", label=f"B = {b}"
        )
    curves.axhline(record["target"], color="grey", linestyle="--", label="target")
    curves.set(
        xlabel="examples of the branch", ylabel="held-out loss", title=f"branches from step {record['step']}"
    )
    measured = [(b, r) for b, r in zip(record["batches"], record["overhead"], strict=True) if r is not None]
    if measured:
        overhead.plot(*zip(*measured, strict=True), "s-", color="C3", label="r(B) = S(B)·B / (S_0·B_0)")
    overhead.axhline(1.2, color="grey", linestyle="--", label="20% over linear scaling")
    overhead.axvline(
        record["b_simple"], color="C0", linestyle=":", label=f"B_simple = {record['b_simple']:.3g}"
    )
    if record["critical_batch"] is not None:
        overhead.axvline(record["critical_batch"], color="C3", linestyle="-.", label=record["critical_text"])
    overhead.set(
        xscale="log",
        xlabel="batch size B",
        ylabel="examples over linear scaling",
        title=record["critical_text"],
    )
    for ax in (curves, overhead):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "branches.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return "branches.png"
