"""``gradkit noise-scale``: train for a while, measure ``B_simple``, and turn it into batch-size advice.

It runs the harness' training loop (:func:`gradkit.train.loop.finetune`: same data order, seeding,
checks and run folder as ``gradkit finetune``) on its classifier (a local Hugging Face encoder with a
head, the bundled SST-2 sample by default) with :class:`NoiseScaleProbe` as the method: each step's
batch is split into micro-batches (gradient accumulation), the gradient noise scale is measured from
them (:class:`gradkit.NoiseScale`), and the lr is constant. The run folder holds ``config.json``,
``labels.json``, ``metrics.jsonl`` (loss and ``B_simple`` per step), ``summary.json`` (the final
``B_simple`` and the learning-rate table), ``loss.png``, ``noise_scale.png``, ``lr_vs_batch.png`` and
``steps_examples.png``. Torch and transformers are imported only when the run starts.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from gradkit.errors import GradkitError
from gradkit.train.methods import Method

TABLE_BATCHES = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``gradkit noise-scale`` options."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="local Hugging Face encoder folder (default: bundled all-MiniLM-L6-v2)")
    g.add_argument("--train", help="training file: TSV, CSV or JSON lines (default: bundled SST-2 sample)")
    g.add_argument("--text-col", help="text column: name or 0-based index")
    g.add_argument("--label-col", help="label column: name or 0-based index")
    g.add_argument("--max-length", type=int, default=64, help="tokens per example (default %(default)s)")
    g = p.add_argument_group("training and measurement")
    g.add_argument("--steps", type=int, default=100, help="optimiser steps (default %(default)s)")
    g.add_argument(
        "--batch-size", type=int, default=32, help="known-good batch size, trained with (default %(default)s)"
    )
    g.add_argument("--lr", type=float, default=5e-5, help="known-good learning rate at --batch-size")
    g.add_argument(
        "--micro-batches",
        type=int,
        default=4,
        help="micro-batches per step: the small batch is batch-size/micro-batches (default %(default)s)",
    )
    g.add_argument(
        "--optimizer", choices=["adam", "sgd"], default="adam", help="optimiser of the measuring run"
    )
    g.add_argument(
        "--trainable", choices=["full", "head"], default="full", help="train every weight or the head only"
    )
    g.add_argument(
        "--beta", type=float, default=0.95, help="EMA coefficient of the estimates (default %(default)s)"
    )
    g.add_argument("--seed", type=int, default=0, help="seeds the data order and the new head")
    g.add_argument("--out", help="run folder, new or empty (default: runs/noise-scale-<time>)")
    g.add_argument(
        "--overwrite", action="store_true", help="allow --out to be a folder that holds files: it is cleared"
    )


def _check(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise GradkitError(f"--steps {args.steps} must be at least 1")
    if args.micro_batches < 2:
        raise GradkitError(
            f"--micro-batches {args.micro_batches} must be at least 2 (two batch sizes are needed)"
        )
    if args.batch_size < args.micro_batches or args.batch_size % args.micro_batches:
        raise GradkitError(
            f"--batch-size {args.batch_size} must be a multiple of --micro-batches {args.micro_batches}; "
            "e.g. --batch-size 32 --micro-batches 4"
        )
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise GradkitError(f"--lr {args.lr} must be a positive learning rate, e.g. --lr 5e-5")
    if not 0.0 <= args.beta < 1.0:
        raise GradkitError(f"--beta {args.beta} must be in [0, 1), e.g. --beta 0.95")
    if args.max_length < 2:
        raise GradkitError(f"--max-length {args.max_length} must be at least 2 tokens")


def advice_table(
    b_simple: float, batch: int, lr: float, batches: list[int] = TABLE_BATCHES
) -> list[dict[str, float]]:
    """Suggested learning rates and predicted costs per batch size, from one known-good (batch, lr).

    SGD: McCandlish et al. (2018) with ``B_noise ≈ B_simple``. Adam: Li et al. (2024) mean-field sign
    rule with ``κ² ≈ B_simple`` and the peak at ``B_simple``. Steps and examples relative to their
    minima: ``S/S_min = 1 + B_simple/B``, ``E/E_min = 1 + B/B_simple`` (``B_crit ≈ B_simple``).
    """
    from gradkit.scaling.laws import lr_for_batch

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

    from gradkit.files import atomic_path

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


class NoiseScaleProbe(Method):
    """The measuring run as a harness method: each step's batch is split into ``micro_batches``
    micro-batches whose gradients accumulate (``.grad`` ends as the whole batch's mean gradient), and
    :meth:`NoiseScale.accumulation_hooks` reads the micro-batch and batch squared norms for the
    two-batch-size estimate. The optimiser is plain AdamW or SGD at the given lr (no weight decay, no
    clipping: the run measures, it does not tune), and nothing is saved but the run folder's files."""

    name = "noise-scale"

    def __init__(self, micro_batches: int, optimizer: str, trainable: str, beta: float):
        self.micro_batches, self.optimizer_name, self.trainable, self.beta = (
            micro_batches,
            optimizer,
            trainable,
            beta,
        )
        self.gns: Any = None
        self._hooks: Any = None
        self._recorder: Any = None

    def prepare(self, model, cfg, batches):
        from gradkit.scaling.noise_scale import NoiseScale

        for name, p in model.named_parameters():
            p.requires_grad_(self.trainable == "full" or name.startswith("head."))
        self.gns = NoiseScale(model, beta=self.beta)
        self._hooks = self.gns.accumulation_hooks()
        self._recorder = self._hooks.__enter__()
        return model

    def make_optimizer(self, model, cfg, lr):
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        return (torch.optim.AdamW if self.optimizer_name == "adam" else torch.optim.SGD)(params, lr=lr)

    def train_step(self, model, batch, optimizer, accelerator, cfg):
        import torch

        from gradkit.train.batching import split_batch

        k = self.micro_batches
        micro = len(batch["labels"]) // k
        total = torch.zeros(())
        # k equal micro-batches in the stream's order (the estimator needs the size b = B / k), each
        # padded only to its own longest text
        for part, _ in split_batch(batch, max_examples=micro, trim=False):
            loss = model(**part).loss
            accelerator.backward(loss / k)  # .grad ends as the mean gradient over the whole batch
            self._recorder.micro_step(micro)
            total += loss.detach().float() / k
        self._recorder.step()  # before the optimiser step: reads the accumulated gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def step_metrics(self) -> dict[str, Any]:
        return self.gns.metrics()

    def save(self, model, out_dir):
        """Nothing to keep but the measurement: take the hooks off."""
        self.close()

    def close(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = self._recorder = None


def run_noise_scale(args: argparse.Namespace, *, progress: bool = True) -> dict[str, Any]:
    """Run ``gradkit noise-scale`` with parsed ``args`` through the harness' training loop
    (:func:`gradkit.train.loop.finetune` with :class:`NoiseScaleProbe`); prints the table and returns
    the summary."""
    _check(args)
    from gradkit.files import write_json
    from gradkit.train.config import TrainConfig
    from gradkit.train.loop import finetune

    cfg = TrainConfig(
        method=NoiseScaleProbe.name,
        model=args.model,
        train=args.train,
        text_col=args.text_col,
        label_col=args.label_col,
        max_length=args.max_length,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=None,
        seed=args.seed,
        out=args.out or str(Path("runs") / f"noise-scale-{time.strftime('%Y%m%d-%H%M%S')}"),
        overwrite=args.overwrite,
        schedule="constant",
        evaluate=False,
        options={k: getattr(args, k) for k in ("micro_batches", "optimizer", "trainable", "beta")},
    )
    probe = NoiseScaleProbe(args.micro_batches, args.optimizer, args.trainable, args.beta)
    try:
        harness_summary = finetune(cfg, progress=progress, method=probe)
    finally:
        probe.close()
    gns = probe.gns
    out = Path(harness_summary["out"])
    steps, values = [], []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
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
    summary["out"] = str(out)
    return summary
