"""The command line: a real subprocess, so exit codes, stderr and files are what a user sees."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


def gradkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "gradkit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradkit: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "content, args, fragments",
    [
        (None, ["--train", "missing.tsv"], ["missing.tsv"]),
        ("sentence\tlabel\n", [], ["no examples"]),
        ("sentence\tlabel\ngood\t1\nbad\t\n", [], ["line 3"]),
        ("sentence\tlabel\ngood\t1\nfine\t1\n", [], ["class"]),
        ("sentence\tlabel\ngood\t1\nbad\t0\n", ["--label-col", "stars"], ["stars", "label"]),
    ],
    ids=["missing-file", "empty-file", "row-without-label", "one-class", "unknown-column"],
)
def test_bad_data_gives_one_line_error_and_writes_nothing(tmp_path, tiny_model_dir, content, args, fragments):
    if content is not None:
        (tmp_path / "train.tsv").write_text(content)
        args = ["--train", "train.tsv", *args]
    out = tmp_path / "run"
    result = gradkit("finetune", "--model", str(tiny_model_dir), "--out", str(out), *args, cwd=tmp_path)
    assert_clean_error(result, *fragments)
    assert not out.exists()


def test_bad_options_give_one_line_errors(tmp_path, tiny_model_dir):
    assert_clean_error(gradkit("finetune", "--method", "nope", cwd=tmp_path), "unknown method 'nope'")
    assert_clean_error(gradkit("finetune", "--model", str(tmp_path), cwd=tmp_path), "config.json")
    assert_clean_error(gradkit("compare", "--methods", "head,nope", cwd=tmp_path), "unknown method 'nope'")
    assert_clean_error(
        gradkit("compare", "--methods", "head,lora,head", "--out", "c", cwd=tmp_path),
        "names head more than once",
    )
    assert not (tmp_path / "c").exists()
    assert_clean_error(
        gradkit(
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--targets",
            "q_proj",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "r"),
            cwd=tmp_path,
        ),
        "q_proj",
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["finetune", "--precision", "fp8"], ["--precision", "'fp8'", "gradkit finetune --help"]),
        (["compare", "--steps", "x"], ["--steps", "'x'", "gradkit compare --help"]),
        (["compare", "--bogus", "1"], ["--bogus 1", "gradkit compare --help"]),
        (["diagnose", "--blocks"], ["--blocks", "expected one argument"]),
        (["nosuch"], ["'nosuch'", "gradkit --help"]),
        ([], ["command"]),
    ],
    ids=["bad-choice", "bad-int", "unknown-option", "missing-value", "unknown-command", "no-command"],
)
def test_argparse_errors_are_one_line_too(tmp_path, args, fragments):
    """What argparse itself rejects ends like every other bad input: one line, exit 2, no usage block."""
    assert_clean_error(gradkit(*args, cwd=tmp_path), *fragments)
    assert list(tmp_path.iterdir()) == []  # a run's default folder is under the working directory


def test_compare_runs_each_method_and_writes_table_and_plot(tmp_path, tiny_model_dir):
    out = tmp_path / "cmp"
    result = gradkit(
        "compare",
        "--methods",
        "head,lora",
        "--model",
        str(tiny_model_dir),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "| head |" in result.stdout and "| lora |" in result.stdout
    comparison = json.loads((out / "comparison.json").read_text())
    assert [s["method"] for s in comparison["summaries"]] == ["head", "lora"]
    assert all("test_accuracy" in s for s in comparison["summaries"])
    for name in ("table.md", "loss.png", "head/summary.json", "lora/adapter/adapter_config.json"):
        assert (out / name).is_file(), name


def test_default_compare_methods_are_registered_and_include_lora_ga():
    from gradkit.cli import build_parser
    from gradkit.train.methods import available_methods

    args = build_parser().parse_args(["compare"])
    methods = args.methods.split(",")
    assert methods == ["head", "lora", "lora-ga", "full"]
    assert set(methods) <= set(available_methods())


def test_compare_exits_non_zero_with_each_failure_in_one_line(tmp_path, tiny_model_dir):
    """An lr whose AdamW step overflows the weights fails the method inside its child (the loss of
    the last step is computed before its update, so the weights themselves are checked): the table and
    comparison.json are still written with the reason, stderr has one line per failure and no
    traceback, and the exit status is 1 so scripts and CI notice."""
    out = tmp_path / "cmp"
    result = gradkit(
        "compare",
        *("--methods", "head", "--model", str(tiny_model_dir), "--steps", "2", "--batch-size", "8"),
        *("--max-length", "32", "--lr", "1e38", "--out", str(out)),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "gradkit: 1 of 1 methods failed (head: the weights became non-finite (inf or NaN" in result.stderr
    (summary,) = json.loads((out / "comparison.json").read_text())["summaries"]
    assert summary["method"] == "head" and summary["error"].startswith("the weights became non-finite")
    assert "\n" not in summary["error"]
    assert f"| head | failed: {summary['error']} |" in (out / "table.md").read_text()


def test_json_files_hold_no_nan_or_infinity(tmp_path):
    from gradkit.files import json_line, write_json

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))

    write_json(
        tmp_path / "s.json", {"loss": float("nan"), "at": [1.0, float("inf")], "ema": {"acc": -math.inf}}
    )
    assert strict((tmp_path / "s.json").read_text()) == {
        "loss": None,
        "loss_not_finite": "nan",
        "at": [1.0, None],
        "ema": {"acc": None, "acc_not_finite": "-inf"},
    }
    assert strict(json_line({"lr": float("nan"), "step": 3})) == {
        "lr": None,
        "lr_not_finite": "nan",
        "step": 3,
    }


def _options():
    import argparse

    from gradkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                yield command, parser, action


def test_help_loads_no_torch_and_every_option_has_help_and_its_default():
    """``gradkit --help`` stays fast: building the parser imports neither torch nor transformers (checked
    in a fresh interpreter); every option says what it does and shows its default."""
    import argparse

    code = "import sys, gradkit.cli; gradkit.cli.build_parser(); print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    for command, parser, action in _options():
        assert action.help, f"gradkit {command} {action.option_strings[0]} has no help text"
        # ArgumentDefaultsHelpFormatter appends "(default: ...)" to every option with help text
        assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter, command


def test_cli_choices_written_out_match_the_library():
    from gradkit.lora import ga
    from gradkit.optim import lora_pro, lora_pro_math
    from gradkit.train import method_options

    assert (method_options.ESTIMATORS, method_options.SCALES) == (ga.ESTIMATORS, ga.SCALES)
    assert method_options.MOMENTS == lora_pro.MOMENTS and method_options.OPTIMIZERS == lora_pro.OPTIMIZERS
    assert method_options.DEFAULT_MOMENTS == lora_pro.DEFAULT_MOMENTS
    assert method_options.X_SOLUTIONS == lora_pro_math.X_SOLUTIONS


@pytest.mark.distributed
def test_bad_input_under_torchrun_says_so_once_and_every_rank_exits_2(tmp_path, tiny_model_dir):
    """torchrun turns any failed child into its own ChildFailedError report and exit status 1 (it has
    no way to pass a child's status on); what gradkit controls is the line (once, from rank 0) and each
    rank's status (2, or a SIGTERM from torchrun once the first rank has ended)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["gradkit", "finetune", "--model", str(tiny_model_dir), "--steps", "2", "--batch-size", "4"]
    cmd += ["--out", str(tmp_path / "run"), "--lr", "-1"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr  # torchrun's own status for a failed child
    lines = [line for line in result.stderr.splitlines() if line.startswith("gradkit: error: ")]
    assert lines == [
        "gradkit: error: --lr -1.0 is not allowed: it must be finite and > 0 (a positive learning rate); pass e.g. --lr 1e-4"
    ], result.stderr
    codes = [line.split(":", 1)[1].split()[0] for line in result.stderr.splitlines() if "exitcode  :" in line]
    assert "2" in codes and set(codes) <= {"2", "-15"}, result.stderr  # -15: stopped by torchrun
    assert not (tmp_path / "run").exists()
