"""The ``gradkit`` command. Bad input ends with one line ``gradkit: error: ...`` and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from gradkit.errors import GradkitError


def _common(parser: argparse.ArgumentParser, method_options: bool = True) -> None:
    from gradkit.train.config import TrainConfig
    from gradkit.train.methods import available_methods

    d = TrainConfig()
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", help="local Hugging Face encoder folder (default: bundled all-MiniLM-L6-v2)")
    g.add_argument(
        "--train", help="training file: TSV, CSV or JSON lines (default: bundled SST-2 sample, 4,000 rows)"
    )
    g.add_argument("--test", help="test file, same format (default: bundled SST-2 GLUE dev set, 872 rows)")
    g.add_argument(
        "--text-col", help="text column: name or 0-based index (default: sentence/text, else first)"
    )
    g.add_argument("--label-col", help="label column: name or 0-based index (default: label, else last)")
    g.add_argument(
        "--text-pair-col",
        help="second text of a sentence pair (NLI, paraphrase, similarity): name or 0-based index; the "
        "tokenizer encodes the two as a pair (default: sentence2 when the file has sentence1 and sentence2)",
    )
    g.add_argument(
        "--task",
        choices=["classification", "regression", "causal-lm"],
        default=d.task,
        help="classification (label ids, cross-entropy), regression (a numeric label, one output, mean "
        'squared error) or causal-lm (JSON lines of {"prompt", "response"} on a local AutoModelForCausalLM '
        "folder: mean cross-entropy of the response tokens; see docs/causal_lm.md)",
    )
    g.add_argument(
        "--metric",
        choices=["accuracy", "macro_f1", "mcc", "pearson", "spearman", "perplexity"],
        help="the metric reported and used by --keep-best (default: accuracy for classification, pearson "
        "for regression, perplexity for causal-lm, where lower is better; mcc is Matthews correlation, as "
        "GLUE scores CoLA)",
    )
    g.add_argument(
        "--text-field",
        metavar="NAME",
        help="causal-lm: read plain texts from this JSON key and train on every token (default: the "
        '"prompt"/"response" pair, loss on the response only; a .txt file is one text per line)',
    )
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=d.precision,
        help="bf16: the forward pass in bfloat16 autocast (CPU and CUDA), weights, gradients and optimiser "
        "states kept in fp32",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model over the processes with FSDP2 (fully_shard on each transformer block and the "
        "root) instead of replicating it (DDP); needs torchrun --nproc_per_node N with N >= 2 (docs/fsdp.md)",
    )
    g.add_argument(
        "--max-length", type=int, default=d.max_length, help="tokens per example (default %(default)s)"
    )
    g.add_argument("--pooling", choices=["mean", "cls"], default=d.pooling, help="pooled output for the head")
    g = parser.add_argument_group("the head")
    g.add_argument(
        "--head-init",
        choices=["random", "labels"],
        default=d.head_init,
        help="random: a new N(0, 0.02) head; labels: scale * cos(sentence, label text) with the encoder's "
        "own embeddings of the label texts (a zero-shot classifier from step 0)",
    )
    g.add_argument(
        "--label-text",
        help="with --head-init labels: one text per label, comma-separated in label-id order (or a JSON "
        "list), e.g. terrible,great (default: the label names of the file)",
    )
    g.add_argument(
        "--label-template",
        help="with --head-init labels: each label text is put in this template's {}, e.g. 'It was {}.'",
    )
    g.add_argument(
        "--head-warmup",
        type=int,
        default=d.head_warmup,
        metavar="N",
        help="first train the head alone for N steps on the frozen encoder (LP-FT), then the method; the "
        "same warm-up for every method of a compare (0: none)",
    )
    g.add_argument(
        "--head-lr",
        type=float,
        help="learning rate of the head warm-up (AdamW, constant; default: the head method's 2e-3)",
    )
    g = parser.add_argument_group("budget and optimisation")
    g.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (default %(default)s)")
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="global batch size (default %(default)s)"
    )
    g.add_argument("--lr", type=float, help="peak learning rate (default: each method's own)")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="linear warmup share of steps")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="decoupled weight decay (not on biases, norms)",
    )
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seeds the data order, the new head and each method's randomness",
    )
    g.add_argument("--out", help="run folder, new or empty (default: a new runs/<method>-<time>)")
    g.add_argument(
        "--overwrite", action="store_true", help="allow --out to be a folder that holds files: it is cleared"
    )
    g.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help="also keep a weight EMA with this decay (e.g. 0.99); evaluates and saves both the raw "
        "and the EMA weights (the EMA never changes training)",
    )
    g.add_argument(
        "--ema-warmup",
        choices=["none", "power", "bias_corrected"],
        default=d.ema_warmup,
        help="EMA warmup schedule (default %(default)s: the average starts at the first step's weights)",
    )
    g = parser.add_argument_group("evaluation, checkpoints and logging")
    g.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="micro-batches of --batch-size per optimiser step: the step's batch is batch-size x this",
    )
    g.add_argument(
        "--no-trim-padding",
        dest="trim_padding",
        action="store_false",
        help="run each batch as one forward pass padded to its longest text (default: length-sorted parts "
        "with little padding, the same gradient up to rounding)",
    )
    g.add_argument("--dev", help="dev file for --eval-every and --keep-best (same format as --train)")
    g.add_argument(
        "--dev-fraction",
        type=float,
        help="carve this share of the training file off as the dev set (seeded; not trained on)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="evaluate on the dev set every N steps (and at the end); 0: at the end only",
    )
    g.add_argument(
        "--keep-best",
        action="store_true",
        help="also keep the weights of the best dev score (--metric) in best/ and test them (chosen on dev only)",
    )
    g.add_argument(
        "--save-every",
        type=int,
        default=d.save_every,
        help="write a checkpoint every N steps (resume with gradkit finetune --resume RUN_DIR); 0: none",
    )
    g.add_argument(
        "--report-to",
        choices=["none", "tensorboard"],
        default=d.report_to,
        help="also log metrics to TensorBoard (RUN_DIR/tensorboard; needs pip install tensorboard)",
    )
    g = parser.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r")
    g.add_argument(
        "--alpha", type=float, default=d.alpha, help="LoRA alpha: updates are scaled by alpha/rank"
    )
    g.add_argument(
        "--targets",
        default=d.targets,
        help="comma-separated Linear names to adapt, or all-linear (default) for every encoder Linear",
    )
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(rank) instead of alpha/rank")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on LoRA's input")
    if method_options:
        for cls in available_methods().values():
            cls.add_arguments(parser)


_CONFIG_KEYS = (
    "model",
    "train",
    "test",
    "text_col",
    "label_col",
    "text_pair_col",
    "task",
    "metric",
    "text_field",
    "precision",
    "fsdp",
    "head_init",
    "label_text",
    "label_template",
    "head_warmup",
    "head_lr",
    "max_length",
    "pooling",
    "steps",
    "batch_size",
    "lr",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "out",
    "overwrite",
    "rank",
    "alpha",
    "targets",
    "rslora",
    "lora_dropout",
    "ema",
    "ema_warmup",
    "grad_accum",
    "trim_padding",
    "dev",
    "dev_fraction",
    "eval_every",
    "keep_best",
    "save_every",
    "report_to",
)


def _config(args: argparse.Namespace, method: str):
    from gradkit.train.config import TrainConfig

    values = vars(args)
    known = {k: values[k] for k in _CONFIG_KEYS}
    if known["ema_warmup"] == "none":
        known["ema_warmup"] = None
    options = {
        k: v
        for k, v in values.items()
        if k not in _CONFIG_KEYS and k not in ("command", "method", "methods", "debug", "resume")
    }
    return TrainConfig(method=method, options=options, **known)


def _check_resume_alone(args: argparse.Namespace) -> None:
    """``--resume`` takes every setting from the run's config.json: refuse options that would be ignored."""
    defaults = vars(build_parser().parse_args(["finetune"]))
    given = [
        "--" + key.replace("_", "-")
        for key, value in vars(args).items()
        if key not in ("resume", "command") and value != defaults.get(key)
    ]
    if given:
        raise GradkitError(
            f"--resume takes its settings from the run's config.json; drop {', '.join(given)} "
            "(to change a setting, start a new run)"
        )


class _OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown option, a value outside ``choices``, a missing value) as one
    line through main's GradkitError path: exit 2, no usage block, nothing written."""

    def error(self, message: str) -> NoReturn:
        raise GradkitError(f"{message}; `{self.prog} --help` lists every option")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse reports a subcommand's unknown options from the top parser; name the subcommand
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            raise GradkitError(
                f"unrecognized arguments: {' '.join(unknown)}; `{prog} --help` lists every option"
            )
        return parsed


def build_parser() -> argparse.ArgumentParser:
    from gradkit.train.compare import DEFAULT_METHODS
    from gradkit.train.methods import available_methods

    methods = available_methods()
    parser = _OneLineParser(prog="gradkit", description="Cheaper fine-tuning, measured.")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = "; ".join(f"{name}: {cls.summary}" for name, cls in sorted(methods.items()))
    defaults = argparse.ArgumentDefaultsHelpFormatter  # every option shows its default
    p = sub.add_parser(
        "finetune",
        help="fine-tune with one method and write a run folder",
        description=f"Methods — {listing}",
        formatter_class=defaults,
    )
    p.add_argument(
        "--method", default="lora", help=f"one of {', '.join(sorted(methods))} (default %(default)s)"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with the settings in its config.json "
        "(give no other option)",
    )
    _common(p)
    p = sub.add_parser(
        "compare", help="run several methods on the same budget and compare them", formatter_class=defaults
    )
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="comma-separated (default %(default)s)"
    )
    p.add_argument("--debug", action="store_true", help="print the full traceback of a method that fails")
    _common(p)
    from gradkit.scaling.cli import add_arguments as noise_scale_arguments

    p = sub.add_parser(
        "noise-scale",
        help="measure the gradient noise scale while training; suggest learning rates per batch size",
        formatter_class=defaults,
    )
    noise_scale_arguments(p)
    from gradkit.diagnose_cli import add_arguments as diagnose_arguments

    p = sub.add_parser(
        "diagnose",
        help="audit a model's init and measure its per-block gradient flow on a few batches; writes a run folder",
        formatter_class=defaults,
    )
    diagnose_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local folders; never reach for a hub
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "finetune":
            from gradkit.train.loop import finetune, resume

            if args.resume is not None:
                _check_resume_alone(args)
                summary = resume(args.resume)
            else:
                summary = finetune(_config(args, args.method))
            from gradkit.train.metrics import format_metric

            metric = summary["metric"]
            print(
                f"{summary['method']}: test {metric} {format_metric(metric, summary.get(f'test_{metric}'))}, "
                f"final train loss {summary['final_train_loss']:.4f}, {summary['train_seconds']:.0f} s; "
                f"run folder {summary['out']}"
            )
        elif args.command == "compare":
            from gradkit.train.compare import compare

            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            summaries = compare(_config(args, methods[0] if methods else "lora"), methods, debug=args.debug)
            failed = [s for s in summaries if "error" in s]
            if failed:  # the table is written; the exit status tells scripts and CI
                listed = "; ".join(f"{s['method']}: {s['error']}" for s in failed)
                print(
                    f"gradkit: {len(failed)} of {len(summaries)} methods failed ({listed})", file=sys.stderr
                )
                return 1
        elif args.command == "noise-scale":
            from gradkit.scaling.cli import run_noise_scale

            run_noise_scale(args)
        elif args.command == "diagnose":
            from gradkit.diagnose_cli import run_diagnose

            run_diagnose(args)
    except GradkitError as err:
        print(f"gradkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "gradkit: interrupted (a run with --save-every continues with gradkit finetune --resume RUN_DIR)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
