"""The ``gradkit`` command and its subcommands (finetune, compare, noise-scale, diagnose). Bad input
ends with one line ``gradkit: error: ...`` and exit status 2.

Under torchrun or ``accelerate launch`` every process exits 2 and the first one (``RANK`` 0) prints
the line; the launcher then adds its own report of the ranks' exit codes (a ``ChildFailedError``
traceback, launcher exit status 1: torchrun turns any failed child into that).

Building the parser imports no torch (``gradkit --help`` stays fast): the options come from the
torch-free settings dataclasses, and each command imports the harness when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from gradkit.cli.diagnose import add_arguments as add_diagnose_arguments
from gradkit.cli.diagnose import run_diagnose
from gradkit.cli.finetune import (
    add_compare_arguments,
    add_finetune_arguments,
    method_listing,
    run_compare,
    run_finetune,
)
from gradkit.cli.noise_scale import add_arguments as add_noise_scale_arguments
from gradkit.cli.noise_scale import run_noise_scale
from gradkit.errors import GradkitError


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
    """The ``gradkit`` parser with its four subcommands; every option shows its default."""
    parser = _OneLineParser(prog="gradkit", description="Cheaper fine-tuning, measured.")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter  # every option shows its default
    p = sub.add_parser(
        "finetune",
        help="fine-tune with one method and write a run folder",
        description=f"Methods — {method_listing()}",
        formatter_class=defaults,
    )
    add_finetune_arguments(p)
    p = sub.add_parser(
        "compare", help="run several methods on the same budget and compare them", formatter_class=defaults
    )
    add_compare_arguments(p)
    p = sub.add_parser(
        "noise-scale",
        help="measure the gradient noise scale while training; suggest learning rates per batch size",
        description="--batch-size and --lr are a known-good pair: the suggested learning rates scale from it",
        formatter_class=defaults,
    )
    add_noise_scale_arguments(p)
    p = sub.add_parser(
        "diagnose",
        help="audit a model's init and measure its per-block gradient flow on a few batches; writes a run folder",
        formatter_class=defaults,
    )
    add_diagnose_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``gradkit`` command line on ``argv`` (default: ``sys.argv``); returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local folders; never reach for a hub
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command == "finetune":
            return run_finetune(args, parser)
        if args.command == "compare":
            return run_compare(args)
        if args.command == "noise-scale":
            run_noise_scale(args)
        elif args.command == "diagnose":
            run_diagnose(args)
    except GradkitError as err:
        # under torchrun / accelerate launch every rank checks the same input and exits 2; the first
        # process alone says why, so the line appears once (the launcher then reports the exit codes)
        if os.environ.get("RANK", "0") == "0":
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
