"""mezo under data parallelism: 2 processes (torchrun, gloo on CPU) draw the same directions and
all-reduce only scalars, so every rank ends with bit-identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HYBRID = ["--zo-estimator", "fzoo", "--zo-samples", "2", "--zo-exact", "head"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("objective", "extra"),
    [("loss", []), ("f1", []), ("loss", HYBRID)],
    ids=["loss", "f1", "fzoo-exact-head"],
)
def test_two_processes_take_the_same_zeroth_order_steps(tmp_path, tiny_model_dir, objective, extra):
    """With the loss the steps move every weight (embedding rows included: each rank looks up other
    rows, so the sparse-embedding shortcut must be off); with F1 the metric comes from counts summed
    over the ranks; with an exact head each rank's head gradient is averaged over the ranks (without
    that the heads would part)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "gradkit", "finetune", "--method", "mezo", "--model", str(tiny_model_dir)]
    cmd += ["--zo-params", "all", "--objective", objective, "--lr", "1e-2", "--steps", "3"]
    cmd += ["--batch-size", "8", "--max-length", "32", "--out", str(out), *extra]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["ranks_identical"] is True  # SHA-256 of every parameter, gathered from both ranks
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    if objective == "loss":  # the steps did move the weights, the word embedding included
        from safetensors.torch import load_file

        from gradkit.train.model import load_classifier

        before = load_classifier(str(tiny_model_dir), 2, seed=0).state_dict()
        after = load_file(str(out / "trainable.safetensors"))
        name = "encoder.embeddings.word_embeddings.weight"
        assert not torch.equal(after[name], before[name])
