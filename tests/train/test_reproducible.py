"""Same command, same numbers: a run repeated in a fresh process (another hash seed) saves the same bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_lora_ga_twice_in_fresh_processes_saves_identical_adapters(tiny_model_dir, tmp_path, estimator):
    def run(name: str, hash_seed: str) -> tuple[bytes, list[dict]]:
        out = tmp_path / name
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": hash_seed}
        cmd = [
            sys.executable,
            "-m",
            "gradkit",
            "finetune",
            "--method",
            "lora-ga",
            "--model",
            str(tiny_model_dir),
        ]
        cmd += ["--steps", "4", "--batch-size", "8", "--max-length", "32", "--ga-batches", "2"]
        cmd += ["--ga-estimator", estimator, "--out", str(out)]
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row.pop("seconds")
        return (out / "adapter" / "adapter_model.safetensors").read_bytes(), rows

    first, second = run("first", "1"), run("second", "2")
    assert first[0] == second[0]
    assert first[1] == second[1]
