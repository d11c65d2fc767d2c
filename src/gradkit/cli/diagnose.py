"""``gradkit diagnose``: the init auditor and the per-block gradient flow of a local Hugging Face model.

It loads an encoder (default: the bundled all-MiniLM-L6-v2) with a new classification head (the
harness' :func:`gradkit.train.model.load_classifier`), draws ``--batches`` batches of
``--batch-size`` examples from a text-classification file (default: the bundled SST-2 sample) in a
seeded order, and writes a run folder:

- ``audit.md`` / ``audit.json``: :func:`gradkit.audit_init` on the encoder as loaded (one row per tensor),
  held against the architecture's own init where gradkit knows it (BERT's family:
  :func:`gradkit.audit.architecture_rule`). A trained model (:func:`gradkit.audit.looks_trained`: its
  LayerNorms and biases are off the 1 and 0 every init gives them; the default pretrained MiniLM is)
  is not at any init, so its audit is a comparison with the init (how far training moved each tensor:
  std against the init's std, RMS distance from the init's centre) and flags nothing;
- ``gradient_flow.md`` / ``gradient_flow.json``: :func:`gradkit.gradient_flow` of the classifier's
  cross-entropy on those batches (one row per block);
- ``gradient_flow.png`` and ``audit.png``: the plots; ``config.json`` and ``summary.json``.

Every setting is checked before anything is loaded, and the folder is filled under a temporary name
and renamed at the end, so a bad input or a failure leaves nothing behind. Torch and transformers are
imported only when the run starts (``gradkit --help`` stays fast).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradkit.cli.options import add_settings
from gradkit.errors import GradkitError
from gradkit.files import atomic_dir, atomic_path, write_json
from gradkit.train.config import TrainConfig
from gradkit.train.settings import Range, check_values, setting

__all__ = ["DiagnoseOptions", "add_arguments", "run_diagnose", "make_batches"]

# the settings shared with gradkit finetune (declared in TrainConfig), and this command's defaults
SHARED = ("model", "train", "text_col", "label_col", "max_length", "batch_size", "seed", "out", "overwrite")
DEFAULTS = {"max_length": 64, "batch_size": 16}


@dataclass(frozen=True)
class DiagnoseOptions:
    """The measurement's own settings."""

    batches: int = setting(
        4, "batches to average the gradient over", range=Range(1), example="4", group="measurement"
    )
    lr: float = setting(
        1e-3,
        "lr of the AdamW step whose relative update is reported",
        range=Range(0, low_open=True),
        example="1e-3",
        group="measurement",
    )
    blocks: str | None = setting(
        None,
        "glob naming the blocks (default: built-in patterns for BERT, GPT-2, Llama: encoder.layer.N, h.N, "
        "layers.N)",
        group="measurement",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``gradkit diagnose`` options: the shared model and data settings, and the measurement's."""
    add_settings(p, TrainConfig, names=SHARED, defaults=DEFAULTS)
    add_settings(p, DiagnoseOptions)


def _check(args: argparse.Namespace) -> None:
    """Every setting that needs nothing loaded; nothing is written."""
    check_values(DiagnoseOptions, vars(args))
    check_values(TrainConfig, {name: getattr(args, name) for name in SHARED})
    if args.model is not None:
        path = Path(args.model)
        if not path.is_dir():
            raise GradkitError(
                f"--model {args.model}: no such folder; pass a local Hugging Face model folder"
            )
        if not (path / "config.json").is_file():
            raise GradkitError(
                f"--model {args.model} is not a model folder (no config.json there); pass a local Hugging Face "
                "model folder, one that AutoModel.from_pretrained loads"
            )
    if args.train is not None and not Path(args.train).is_file():
        raise GradkitError(f"--train {args.train}: no such file; pass a .tsv, .csv or .jsonl file")
    if args.blocks is not None and not args.blocks.strip():
        raise GradkitError("--blocks is empty; pass a glob such as encoder.layer.* or leave it out")
    if args.out is not None:
        if not str(args.out).strip():
            raise GradkitError("--out is empty; pass a folder path for the run")
        from gradkit.train.validate import check_out  # the harness loads torch: not for --help

        check_out(Path(args.out), args.overwrite, inputs={"--model": args.model, "--train": args.train})


def make_batches(data, tokenizer, batches: int, batch_size: int, max_length: int, seed: int) -> list[dict]:
    """``batches`` tokenized batches (``input_ids``, ``attention_mask``, …, ``labels``) of ``batch_size``
    examples of ``data`` (a :class:`~gradkit.data.text.TextClassificationData`), in the seeded order of
    :func:`gradkit.data.text.shuffled_order`, padded to the longest in each batch, cut at ``max_length``."""
    import torch

    from gradkit.data.text import shuffled_order

    need = batches * batch_size
    if need > len(data):
        raise GradkitError(
            f"--batches {batches} × --batch-size {batch_size} needs {need} examples; {data.path} has {len(data)}; "
            "pass fewer or smaller batches"
        )
    order = shuffled_order(len(data), seed)[:need]
    out = []
    for k in range(batches):
        rows = [data[i] for i in order[k * batch_size : (k + 1) * batch_size]]
        enc = tokenizer(
            [t for t, _ in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out.append({**dict(enc), "labels": torch.tensor([label for _, label in rows], dtype=torch.long)})
    return out


def _audit_plot(rows, path: Path, trained: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.expected_std and r.std > 0]
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    x = list(range(len(shown)))
    ax.plot(x, [r.std for r in shown], "o", markersize=3, label="measured std")
    ax.plot(x, [r.expected_std for r in shown], "_", color="black", markersize=8, label="the init rule's std")
    bad = [] if trained else [(i, r.std) for i, r in enumerate(shown) if r.flags]
    if bad:
        ax.plot(*zip(*bad, strict=True), "x", color="red", markersize=7, label="flagged")
    ax.set_yscale("log")
    ax.set_xlabel("weight tensor (model order; norms and zero-rule biases left out)")
    ax.set_ylabel("std")
    ax.set_title(
        "trained model: std against its init rule's (how far training moved it)"
        if trained
        else "init audit: measured std against the init rule's"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _write_audit(folder: Path, audit, model_path: str, init_rule: str, trained: bool) -> None:
    """audit.md, audit.json and audit.png: the flags of an init, or a trained model's comparison with
    its init (no flags; each tensor's RMS distance from the init's centre added)."""
    from gradkit.audit import comparison_markdown, rms_from_init_value, to_markdown

    rows = [r.as_dict() for r in audit]
    if trained:
        text = (
            f"# {model_path} is a trained model: compared with its init ({init_rule})\n\n"
            "Its LayerNorms and biases are off the 1 and 0 that every init gives them, so it is not held "
            "against an init rule (nothing is flagged). Each row says how far training moved the tensor: "
            "its std against the init's, and its RMS distance from the init's centre.\n\n"
            + comparison_markdown(audit)
        )
        rows = [
            {**d, "flags": [], "rms_from_init_centre": rms_from_init_value(r)}
            for d, r in zip(rows, audit, strict=True)
        ]
    else:
        text = f"# Init audit of {model_path} ({init_rule})\n\n" + to_markdown(audit)
    with atomic_path(folder / "audit.md") as f:
        f.write_text(text)
    write_json(folder / "audit.json", rows)
    _audit_plot(audit, folder / "audit.png", trained)


def run_diagnose(args: argparse.Namespace, *, progress: bool = True) -> dict[str, Any]:
    """Run ``gradkit diagnose`` with parsed ``args``: audit and gradient flow, one run folder; returns the summary."""
    _check(args)
    # the library and the harness load torch: imported when the command runs, not for --help
    from gradkit.audit import architecture_rule, audit_init, looks_trained
    from gradkit.data.text import load_text_classification
    from gradkit.diagnostics import depth_decay, gradient_flow, plot_gradient_flow, to_markdown
    from gradkit.train.model import default_model_path, load_classifier, load_tokenizer
    from gradkit.train.validate import position_limit

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    col = lambda v: int(v) if isinstance(v, str) and v.isdigit() else v  # noqa: E731
    data = load_text_classification(args.train, text_col=col(args.text_col), label_col=col(args.label_col))
    model_path = args.model or default_model_path()
    tokenizer = load_tokenizer(model_path)
    model = load_classifier(model_path, num_labels=data.num_classes, seed=args.seed)
    limit = position_limit(model, tokenizer)
    if limit is not None and args.max_length > limit:
        raise GradkitError(
            f"--max-length {args.max_length} exceeds the {limit} positions of the model ({model_path}); "
            f"pass --max-length 2..{limit}"
        )
    batches = make_batches(data, tokenizer, args.batches, args.batch_size, args.max_length, args.seed)
    say(
        f"data: {len(data)} rows from {data.path}, {data.num_classes} classes; {args.batches} batches of {args.batch_size}"
    )
    t0 = time.perf_counter()
    audit = audit_init(model.encoder)
    trained = looks_trained(audit)
    family = architecture_rule(model.encoder)
    flow = gradient_flow(model, batches, blocks=args.blocks, lr=args.lr)
    seconds = time.perf_counter() - t0

    out = Path(args.out or Path("runs") / f"diagnose-{time.strftime('%Y%m%d-%H%M%S')}")
    grads = [r.grad_norm for r in flow]
    finite = [g for g in grads if math.isfinite(g) and g > 0]
    summary: dict[str, Any] = {
        "model": model_path,
        "train": data.path,
        "examples": args.batches * args.batch_size,
        "tensors": len(audit),
        "weights": "trained" if trained else "init",
        "init_rule": f"{family[0]}: N(0, {family[1]:g}²), biases 0, norms 1/0"
        if family
        else "per tensor (auto)",
        "tensors_flagged": [] if trained else [r.name for r in audit if r.flags],
        "rules": sorted({r.rule for r in audit if r.rule}),
        "blocks": len(flow),
        "blocks_flagged": {r.name: list(r.flags) for r in flow if r.flags},
        "grad_norm_max_over_min": max(finite) / min(finite) if finite else None,
        "depth_decay_per_block": depth_decay(grads),
        "lr": args.lr,
        "seconds": seconds,
        "files": [
            "config.json",
            "summary.json",
            "audit.md",
            "audit.json",
            "audit.png",
            "gradient_flow.md",
            "gradient_flow.json",
            "gradient_flow.png",
        ],  # fmt: skip
    }
    config = {k: v for k, v in vars(args).items() if k != "command"}
    with atomic_dir(out) as tmp:
        write_json(tmp / "config.json", config)
        _write_audit(tmp, audit, model_path, summary["init_rule"], trained)
        with atomic_path(tmp / "gradient_flow.md") as f:
            f.write_text(
                f"# Gradient flow of {model_path} on {args.batches} × {args.batch_size} examples of {data.path}\n\n"
                f"AdamW lr {args.lr:g}; flags: vanishing below median/10, exploding above median×10 "
                "(see gradkit.gradient_flow).\n\n" + to_markdown(flow)
            )
        write_json(tmp / "gradient_flow.json", [r.as_dict() for r in flow])
        plot_gradient_flow(flow, tmp / "gradient_flow.png", title=f"gradient flow: {Path(model_path).name}")
        write_json(tmp / "summary.json", summary)
    spread = summary["grad_norm_max_over_min"]
    audited = (
        f"{len(audit)} tensors of a trained model, compared with its init (audit.md), not flagged"
        if trained
        else f"{len(audit)} tensors, {len(summary['tensors_flagged'])} flagged"
    )
    say(
        f"audit: {audited}; gradient flow: {len(flow)} blocks, "
        f"grad norm max/min {'n/a' if spread is None else f'{spread:.3g}'}, {len(summary['blocks_flagged'])} "
        f"flagged; run folder {out}"
    )
    summary["out"] = str(out)
    return summary
