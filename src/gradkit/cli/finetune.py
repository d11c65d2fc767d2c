"""``gradkit finetune`` and ``gradkit compare``: every option is derived from a field of
:class:`~gradkit.train.config.TrainConfig` or of a method's options dataclass
(:mod:`gradkit.train.method_options`). The harness is imported when a command runs, not when the
parser is built, so ``gradkit --help`` loads no torch."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from gradkit.cli.options import add_settings, values_of
from gradkit.errors import GradkitError
from gradkit.train.config import TrainConfig
from gradkit.train.method_options import CATALOGUE, COMPARED_BY_DEFAULT, method_groups
from gradkit.train.method_options import group_title as method_group_title

# options of the command itself, not settings of a run
COMMAND_OPTIONS = ("resume", "methods", "debug")


def add_run_settings(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig option, then each method group's options."""
    add_settings(parser, TrainConfig)
    for group in method_groups():
        add_settings(parser, group, title=method_group_title(group))


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``gradkit finetune`` options."""
    parser.add_argument(
        "--method", default="lora", help=f"one of {', '.join(sorted(CATALOGUE))} (default %(default)s)"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with the settings in its config.json "
        "(give no other option)",
    )
    add_run_settings(parser)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``gradkit compare`` options."""
    parser.add_argument(
        "--methods", default=",".join(COMPARED_BY_DEFAULT), help="comma-separated (default %(default)s)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="print the full traceback of a method that fails"
    )
    add_run_settings(parser)


def method_listing() -> str:
    """``head: linear probe...; lora: ...``: the methods and their one-line summaries."""
    return "; ".join(f"{name}: {card.summary}" for name, card in sorted(CATALOGUE.items()))


def config_from_args(args: argparse.Namespace, method: str) -> TrainConfig:
    """The run's settings from parsed ``args``: the TrainConfig fields by name, and every method
    group's options as the plain dict ``cfg.options`` (config.json keeps it; each method reads its
    own dataclass from it)."""
    options = {
        field.name: getattr(args, field.name)
        for group in method_groups()
        for field in dataclasses.fields(group)
    }
    return TrainConfig(**{**values_of(args, TrainConfig), "method": method, "options": options})


def check_resume_alone(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--resume`` takes every setting from the run's config.json: refuse options that would be ignored."""
    defaults = vars(parser.parse_args(["finetune"]))
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


def run_finetune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run (or resume) one method and print its headline line."""
    from gradkit.train.loop import finetune, resume  # the harness loads torch: not for --help
    from gradkit.train.metrics import format_metric

    if args.resume is not None:
        check_resume_alone(args, parser)
        summary = resume(args.resume)
    else:
        summary = finetune(config_from_args(args, args.method))
    metric = summary["metric"]
    print(
        f"{summary['method']}: test {metric} {format_metric(metric, summary.get(f'test_{metric}'))}, "
        f"final train loss {summary['final_train_loss']:.4f}, {summary['train_seconds']:.0f} s; "
        f"run folder {summary['out']}" + (f"; WARNING {summary['warning']}" if "warning" in summary else "")
    )
    return 1 if "warning" in summary else 0


def run_compare(args: argparse.Namespace) -> int:
    """Run every method of ``--methods``; exit status 1 when any failed (the table is written)."""
    from gradkit.train.compare import compare  # the harness loads torch: not for --help

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    summaries = compare(config_from_args(args, methods[0] if methods else "lora"), methods, debug=args.debug)
    failed = [s for s in summaries if "error" in s]
    if failed:  # the table is written; the exit status tells scripts and CI
        listed = "; ".join(f"{s['method']}: {s['error']}" for s in failed)
        print(f"gradkit: {len(failed)} of {len(summaries)} methods failed ({listed})", file=sys.stderr)
        return 1
    return 0
