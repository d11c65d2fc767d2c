"""Data-parallel training: 2 processes (torchrun, gloo on CPU) end every run with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.distributed
def test_two_processes_train_to_the_same_weights_on_every_rank(tmp_path, tiny_model_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "gradkit",
        "finetune",
        "--method",
        "full",
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
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["ranks_identical"] is True  # SHA-256 of every parameter, gathered from both ranks
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def _launch(tmp_path, tiny_model_dir, *launcher: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        *launcher,
        *("-m", "gradkit", "finetune", "--method", "head", "--model", str(tiny_model_dir)),
        *("--steps", "2", "--batch-size", "4", "--max-length", "16", "--out", str(out)),
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((out / "summary.json").read_text())


@pytest.mark.distributed
def test_the_readmes_accelerate_line_starts_two_processes_on_cpu(tmp_path, tiny_model_dir):
    """README: ``accelerate launch --multi_gpu --num_processes 2 -m gradkit ...`` (torchrun underneath,
    gloo on a machine without GPUs)."""
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
    _, summary = _launch(tmp_path, tiny_model_dir, *launcher)
    assert summary["num_processes"] == 2 and summary["ranks_identical"] is True


@pytest.mark.distributed
def test_a_launch_asking_for_processes_that_never_start_warns(tmp_path, tiny_model_dir):
    """Without --multi_gpu, ``accelerate launch --num_processes 2`` on a machine without GPUs starts one
    process: the run says so instead of silently training alone."""
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2")
    result, summary = _launch(tmp_path, tiny_model_dir, *launcher)
    assert summary["num_processes"] == 1
    assert "asked for several processes but runs as one" in result.stderr
