"""docs/fsdp.md's torchrun example runs as written on 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "fsdp_example.py"


def test_the_documented_torchrun_example_runs(tmp_path):
    """Five LoRA-Pro steps after LoRA-GA with an EMA and a zeroth-order step: every step prints a
    finite loss, both ranks report the same zeroth-order loss, and the EMA file has every weight."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*cmd, str(SCRIPT), str(tmp_path / "fsdp-run")],  # a folder that does not exist yet, as in the docs
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    steps = re.findall(r"^step \d+ loss ([0-9.]+)$", result.stdout, re.M)
    assert len(steps) == 5
    zo = re.findall(r"^rank (\d) zeroth-order loss ([0-9.]+)$", result.stdout, re.M)
    assert sorted(r for r, _ in zo) == ["0", "1"] and zo[0][1] == zo[1][1]
    saved = load_file(str(tmp_path / "fsdp-run" / "ema.safetensors"))
    assert any("lora_A" in k for k in saved) and any("base_layer.weight" in k for k in saved)
    assert saved["base_model.model.blocks.0.up.base_layer.weight"].shape == (64, 32)
