"""Bi-encoder sentence pairs in two processes (torchrun, gloo on CPU) on the tiny BERT: STS-B regression
with the cosine-MSE loss (a mean over examples, so each rank's half-batch gradients average to the whole
batch's) trained by LoRA and by full fine-tuning ends with the same weights under DDP and under --fsdp,
and so does RTE with the similarity head (its threshold fitted on every rank from the same rows).

CoSENT ranks the cosines within each rank's share of the batch, so a 2-process CoSENT run differs from a
1-process one by design; under DDP and --fsdp each rank ranks the same share, and the two agree.

All runs are one launch: a driver calls the CLI's ``main`` once per command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parents[2] / "data"

DRIVER = """
import json, os, sys
from gradkit.cli import main

for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        sys.exit(f"failed: {argv}")
# every run ended; skip the interpreter teardown, where torch 2.13's gloo backend now and then aborts
# (see tests/fsdp/fsdp_common.exit_without_teardown)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""

# the two runs differ only in how the gradient mean is reduced (reduce-scatter vs all-reduce; exact for
# 2 ranks), as in tests/train/test_fsdp_harness.py
TOLERANCE = 1e-6
RUNS = ("mse-lora", "mse-full", "cosent-lora", "similarity-lora")


def _args(model: Path, root: Path, run: str, fsdp: bool) -> list[str]:
    shape, method = run.split("-")
    out = root / f"{run}-{'fsdp' if fsdp else 'ddp'}"
    args = ["finetune", "--method", method, "--model", str(model), "--pair-encoding", "bi"]
    args += ["--steps", "3", "--batch-size", "8", "--max-length", "32", "--out", str(out)]
    if shape in ("mse", "cosent"):
        args += ["--task", "regression", "--pair-loss", shape]
        args += ["--train", str(root / "stsb_train.tsv"), "--test", str(root / "stsb_test.tsv")]
    else:
        args += ["--head-init", "similarity"]
        args += ["--train", str(root / "rte_train.tsv"), "--test", str(root / "rte_test.tsv")]
    return args + (["--fsdp"] if fsdp else [])


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bi-distributed")
    for name, source, rows in (
        ("stsb_train", "stsb/train.tsv", 48),
        ("stsb_test", "stsb/dev.tsv", 16),
        ("rte_train", "rte/train.tsv", 48),
        ("rte_test", "rte/dev.tsv", 16),
    ):
        lines = (DATA / source).read_text(encoding="utf-8").splitlines()
        (root / f"{name}.tsv").write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    lines = [_args(tiny_model_dir, root, run, fsdp) for run in RUNS for fsdp in (False, True)]
    driver = root / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(driver), json.dumps(lines)]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def _weights(run: Path, name: str = "adapter") -> dict:
    path = run / name / "adapter_model.safetensors"
    return load_file(str(path if path.is_file() else run / "trainable.safetensors"))


@pytest.mark.distributed
@pytest.mark.parametrize("run", RUNS)
def test_bi_runs_under_fsdp_equal_the_ddp_runs(runs, run):
    ddp, fsdp = runs / f"{run}-ddp", runs / f"{run}-fsdp"
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (ddp, fsdp)]
    for summary in summaries:
        assert summary["num_processes"] == 2 and summary["ranks_identical"] is True
        assert summary["pair_encoding"]["encoding"] == "bi"
    assert [s["fsdp"] for s in summaries] == [False, True]
    assert summaries[0]["pair_encoding"] == summaries[1]["pair_encoding"]
    names = ("adapter", "encoder_adapter") if run.endswith("lora") else ("",)
    for name in names:
        got, want = _weights(fsdp, name), _weights(ddp, name)
        assert got.keys() == want.keys() and len(got) > 1
        diff = max((got[k] - want[k]).abs().max().item() for k in got)
        assert diff <= TOLERANCE, (name, diff)  # measured: 0 for every run
    assert abs(summaries[0]["test_loss"] - summaries[1]["test_loss"]) < 1e-5
    # the weights moved: the runs are compared after training, not at their common start
    start = summaries[0]["step0"]["test_loss"]
    assert summaries[0]["test_loss"] != start
