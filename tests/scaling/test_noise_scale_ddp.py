"""The DDP source (local vs all-reduced gradient, one scalar all-reduce) gives the same B_simple as
micro-batch accumulation on the same data in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradkit import NoiseScale

STEPS = 4


def make_model() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * 8, 5, generator=g, dtype=torch.float64)
    return x, x.sum(1) + 0.5 * torch.randn(STEPS * 8, generator=g, dtype=torch.float64)


def _accumulation_reference() -> list[dict]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gns = NoiseScale(model, beta=0.5)
    x, y = make_data()
    values = []
    with gns.accumulation_hooks() as rec:
        for step in range(STEPS):
            for half in range(2):
                part = slice(step * 8 + half * 4, step * 8 + (half + 1) * 4)
                (torch.nn.functional.mse_loss(model(x[part]).squeeze(-1), y[part]) / 2).backward()
                rec.micro_step(4)
            rec.step()
            opt.step()
            opt.zero_grad()
            values.append({"b_simple": gns.b_simple, **gns.last})
    return values


@pytest.mark.distributed
def test_ddp_source_equals_micro_batch_accumulation(tmp_path):
    out = tmp_path / "ddp.json"
    worker = Path(__file__).with_name("ddp_noise_scale_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*cmd, str(worker), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2
    want = _accumulation_reference()
    assert any(v["b_simple"] is not None for v in want)
    for g, w in zip(got["values"], want, strict=True):
        assert (g["b_small"], g["b_big"]) == (w["b_small"], w["b_big"]) == (4, 8)
        for key in ("small_sq_norm", "big_sq_norm", "grad_sq_norm", "trace_sigma"):
            assert g[key] == pytest.approx(w[key], rel=1e-9), key
        assert (g["b_simple"] is None) == (w["b_simple"] is None)
        if w["b_simple"] is not None:
            assert g["b_simple"] == pytest.approx(w["b_simple"], rel=1e-9)
