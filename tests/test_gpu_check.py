"""benchmarks/gpu_check.sh skips cleanly without CUDA: one line, exit status 0, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def test_gpu_check_skips_without_cuda(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the skip path is what runs on every machine
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == ["gpu_check: skipped, no CUDA device (torch.cuda.is_available() is False)"]
    assert not list(tmp_path.iterdir())  # nothing written
