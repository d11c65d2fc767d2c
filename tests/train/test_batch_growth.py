"""The harness's growing batch (``--batch-schedule noise|ramp``): the budget in examples spent exactly,
the stream read in order, the learning-rate schedule over base batches equal to the step schedule, the
noise schedule's decisions and lr factors from the logged noise scale, resume bit for bit, and two
processes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from gradkit.scaling.batch_schedule import BatchSchedule, noise_multiple, ramp_multiple
from gradkit.train.batch_growth import lr_fraction
from gradkit.train.config import TrainConfig
from gradkit.train.datasets import StepBatches, TrainingStream
from gradkit.train.loop import finetune, resume
from gradkit.train.methods import parts_of

BASE = 8


def config(tiny_model_dir, out: Path, **overrides) -> TrainConfig:
    values = dict(
        method="full",
        model=str(tiny_model_dir),
        batch_size=BASE,
        max_length=32,
        lr=1e-3,
        out=str(out),
    )
    values.update(overrides)
    return TrainConfig(**values)


def rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def weights(run: Path) -> bytes:
    return (run / "trainable.safetensors").read_bytes()


def png_height(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[20:24])[0]


@pytest.mark.parametrize("steps", [1, 7, 30])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.5])
def test_the_lr_over_base_batches_is_transformers_step_schedule(steps, warmup_ratio):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(optimizer, int(-(-warmup_ratio * steps // 1)), steps)
    for used in range(steps + 2):
        assert lr_fraction(used, steps, warmup_ratio, "linear") == reference.lr_lambdas[0](used)
        assert lr_fraction(used, steps, warmup_ratio, "constant") == 1.0


class Indices:
    """Tokens whose batch is the list of its stream positions' row indices."""

    def collate(self, rows):
        return {"labels": torch.tensor(rows)}


@pytest.mark.parametrize("processes", [1, 2])
def test_resized_step_batches_read_the_stream_in_order(processes):
    stream = TrainingStream(50, seed=3)
    shares = [
        StepBatches(
            Indices(), stream, step_examples=4, warmup_steps=2, processes=processes, rank=r, device="cpu"
        )
        for r in range(processes)
    ]
    for batches in shares:
        batches.resize(3, 8)
        batches.resize(5, 16)
        batches.resize(7, 4)  # the last step cut to the budget
    read = []
    for step in range(1, 8):
        for batches in shares:
            read += batches.step(step)["labels"].tolist()
    assert [shares[0].span(s)[1] for s in range(1, 8)] == [4, 4, 8, 8, 16, 16, 4]
    assert read == stream.slice(8, 8 + 60)  # after the warm-up's 2 x 4 examples, nothing skipped or repeated


def test_a_ramp_that_never_grows_is_the_fixed_run_bit_for_bit(tiny_model_dir, tmp_path):
    fixed = finetune(config(tiny_model_dir, tmp_path / "fixed", steps=6), progress=False)
    ramp = finetune(
        config(
            tiny_model_dir,
            tmp_path / "ramp",
            examples=6 * BASE,
            batch_schedule="ramp",
            batch_ramp_examples=10_000,
        ),
        progress=False,
    )
    assert weights(tmp_path / "ramp") == weights(tmp_path / "fixed")
    ramp_rows = [{k: v for k, v in r.items() if k != "batch_size"} for r in rows(tmp_path / "ramp")]
    assert ramp_rows == rows(tmp_path / "fixed")
    assert ramp["test_loss"] == fixed["test_loss"] and ramp["examples"] == fixed["examples"] == 6 * BASE


def test_a_ramp_spends_the_examples_budget_exactly(tiny_model_dir, tmp_path):
    budget, every = 13 * BASE, 2 * BASE
    summary = finetune(
        config(
            tiny_model_dir,
            tmp_path / "run",
            examples=budget,
            batch_schedule="ramp",
            batch_ramp_examples=every,
            batch_max=4 * BASE,
        ),
        progress=False,
    )
    sizes = [r["batch_size"] for r in rows(tmp_path / "run")]
    assert sum(sizes) == budget == summary["examples"] and summary["steps"] == len(sizes)
    seen = 0
    for size in sizes[:-1]:  # each step's batch is the ramp's multiple at the examples seen before it
        assert size == BASE * ramp_multiple(seen, every, 4)
        seen += size
    assert (
        sizes[-1] == budget - seen <= BASE * ramp_multiple(seen, every, 4)
    )  # the last one cut to the budget
    assert [c["batch"] for c in summary["batch_schedule"]["changes"]] == [2 * BASE, 4 * BASE]
    assert png_height(tmp_path / "run" / "loss.png") == 672  # the batch-size panel below the loss


def test_the_noise_schedule_follows_the_logged_noise_scale_and_adams_lr_law(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir, tmp_path / "run", examples=40 * BASE, batch_schedule="noise", batch_check=3)
    summary = finetune(cfg, progress=False)
    log = {r["step"]: r for r in rows(tmp_path / "run")}
    changes = summary["batch_schedule"]["changes"]
    assert changes, "the tiny model's noise scale should ask for a larger batch"
    law = BatchSchedule(BASE, "noise", law="adam")
    batch, factor, used = BASE, 1.0, 0
    for step in sorted(log):
        used += log[step]["batch_size"] // BASE
        change = next((c for c in changes if c["step"] == step), None)
        if change is not None:
            assert step % 3 == 0 and change["b_simple"] == log[step]["b_simple"]
            multiple = noise_multiple(change["b_simple"], BASE, 1.0, 64)
            assert change["batch"] == BASE * multiple > batch
            factor *= law.lr_ratio(batch, change["batch"], change["b_simple"])
            batch = change["batch"]
            assert change["lr_factor"] == factor
        if step + 1 in log:  # the next step's lr: the base-batch schedule times the law's factor
            expected = 1e-3 * (lr_fraction(used, cfg.examples // BASE, 0.1, "linear") * factor)
            assert log[step + 1]["lr"] == pytest.approx(expected, rel=1e-12, abs=0)
            if step + 1 < max(log):
                assert log[step + 1]["batch_size"] == batch
    assert sum(r["batch_size"] for r in log.values()) == cfg.examples


def test_a_stopped_noise_run_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    def cfg(name):
        return config(
            tiny_model_dir,
            tmp_path / name,
            examples=30 * BASE,
            batch_schedule="noise",
            batch_check=2,
            save_every=4,
        )

    through = finetune(cfg("through"), progress=False)
    assert through["batch_schedule"]["changes"][0]["step"] < 8, "a growth before the checkpoint"
    stopped = finetune(cfg("stopped"), progress=False, stop_after=9)
    assert stopped["status"] == "stopped" and stopped["checkpoint_step"] == 8
    again = resume(tmp_path / "stopped", progress=False)
    assert weights(tmp_path / "stopped") == weights(tmp_path / "through")
    assert rows(tmp_path / "stopped") == rows(tmp_path / "through")
    assert again["batch_schedule"] == through["batch_schedule"] and again["test_loss"] == through["test_loss"]


@pytest.mark.distributed
def test_two_processes_grow_the_batch_together(tmp_path, tiny_model_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "gradkit", "finetune", "--method", "full", "--model", str(tiny_model_dir), "--lr", "1e-3"),
        *("--examples", str(40 * BASE), "--batch-size", str(BASE), "--max-length", "32"),
        *("--batch-schedule", "noise", "--batch-check", "3", "--out", str(out)),
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_identical"] is True
    assert summary["examples"] == 40 * BASE and summary["batch_schedule"]["changes"]
    sizes = [r["batch_size"] for r in rows(out)]
    assert sum(sizes) == 40 * BASE and all(size % 2 == 0 for size in sizes)


class OneProcess:
    num_processes = 1


def test_the_noise_monitors_micro_batches_are_consecutive_random_subsets():
    lengths = torch.tensor([9, 2, 7, 3, 8, 1, 6, 4])  # length-sorted parts would regroup these rows
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
    batch = {
        "input_ids": torch.arange(80).view(8, 10) * mask,
        "attention_mask": mask,
        "labels": torch.arange(8),
    }
    cfg = TrainConfig(batch_size=8)
    by_length = parts_of(batch, cfg, OneProcess(), min_parts=2)
    assert [p["labels"].tolist() for p, _ in by_length] != [[0, 1, 2, 3], [4, 5, 6, 7]]
    parts = parts_of(batch, cfg, OneProcess(), min_parts=2, by_length=False)
    assert [p["labels"].tolist() for p, _ in parts] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [w for _, w in parts] == [0.5, 0.5]
