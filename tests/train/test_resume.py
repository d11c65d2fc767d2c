"""Checkpoints and resume: a run stopped at any step and resumed ends bit-identical to one that ran
through, for every method family (backprop AdamW, PEFT LoRA with EMA and best-on-dev weights,
LoRA-GA's offset base, LoRA-Pro's moments, ZerothOrder's generator, policy gradient's sampler) and for
each ``--optimizer`` beside AdamW and LoRA-RITE, in one process and in two (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradkit.errors import GradkitError
from gradkit.train.config import TrainConfig
from gradkit.train.loop import finetune, resume

FAMILIES = {
    "full": {},
    "lora": {"ema": 0.9, "dev_fraction": 0.01, "eval_every": 2, "keep_best": True},
    "lora-ga": {"options": {"ga_batches": 2}},
    "lora-pro": {},
    "mezo": {"lr": 1e-3},
    "policy-gradient": {},
}


def config(tiny_model_dir, out: Path, method: str, **overrides) -> TrainConfig:
    values = dict(
        method=method,
        model=str(tiny_model_dir),
        steps=6,
        batch_size=8,
        max_length=32,
        save_every=2,
        out=str(out),
    )
    values.update(FAMILIES.get(method, {}))
    values.update(overrides)
    return TrainConfig(**values)


def saved_bytes(run: Path) -> dict[str, bytes]:
    """Every weight file the run saved (final, EMA and best), by path inside the run folder."""
    files = sorted(p for p in run.rglob("*.safetensors") if "checkpoints" not in p.parts)
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# --optimizer's peers and LoRA-RITE: the method and its settings
OPTIMIZERS = {
    "lora-muon": ("lora", {"optimizer": "muon"}),
    "full-steepest-spectral": ("full", {"optimizer": "steepest-spectral"}),
    # dev evaluations and checkpoints at Schedule-Free's averaged weights, training at its interpolated ones
    "lora-schedule-free": ("lora", {"optimizer": "schedule-free", "dev_fraction": 0.01, "eval_every": 2}),
    "lora-rite": ("lora-rite", {}),
}


@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_a_stopped_and_resumed_run_ends_bit_identical(tiny_model_dir, tmp_path, method):
    stop_and_resume(tiny_model_dir, tmp_path, method)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_resumes_bit_identical(tiny_model_dir, tmp_path, name):
    method, settings = OPTIMIZERS[name]
    through = stop_and_resume(tiny_model_dir, tmp_path, method, **settings)
    assert through["optimizer"] == settings.get("optimizer", "adamw")


def stop_and_resume(tiny_model_dir, tmp_path: Path, method: str, **settings) -> dict:
    """A run through, and the same run stopped after step 3 (checkpoint at 2) and resumed: the same
    weights, metrics rows and results. Returns the run through's summary."""
    through = finetune(config(tiny_model_dir, tmp_path / "through", method, **settings), progress=False)

    stopped = finetune(
        config(tiny_model_dir, tmp_path / "stopped", method, **settings), progress=False, stop_after=3
    )
    assert stopped["status"] == "stopped" and stopped["checkpoint_step"] == 2
    status = json.loads((tmp_path / "stopped" / "status.json").read_text())
    assert status["status"] == "stopped" and status["checkpoint_step"] == 2
    assert not (tmp_path / "stopped" / "summary.json").exists()

    again = resume(tmp_path / "stopped", progress=False)
    assert again["resumed_from_step"] == 2
    assert json.loads((tmp_path / "stopped" / "status.json").read_text())["status"] == "finished"
    assert saved_bytes(tmp_path / "stopped") == saved_bytes(tmp_path / "through")
    assert len(saved_bytes(tmp_path / "through")) >= 1
    assert train_rows(tmp_path / "stopped") == train_rows(tmp_path / "through")
    for key in ("final_train_loss", "test_accuracy", "test_loss", "ema", "best", "skipped_steps"):
        assert again.get(key) == through.get(key), key
    return through


def test_only_the_latest_checkpoint_is_kept_and_whole(tiny_model_dir, tmp_path):
    finetune(config(tiny_model_dir, tmp_path / "run", "full"), progress=False, stop_after=5)
    root = tmp_path / "run" / "checkpoints"
    latest = json.loads((root / "latest.json").read_text())
    assert {k: latest[k] for k in ("step", "folder")} == {"step": 4, "folder": "step-0000004"}
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-0000004"]
    names = sorted(p.name for p in (root / "step-0000004").iterdir())
    assert names == ["manifest.json", "rng-rank0.pt", "state.pt", "tensors.safetensors"]


def test_lora_ga_best_on_dev_weights_go_into_checkpoints(tiny_model_dir, tmp_path):
    """LoRA-GA's kept factors are views of its SVD: the best-on-dev copy is saved contiguous."""
    run = tmp_path / "run"
    best = dict(dev_fraction=0.01, eval_every=1, keep_best=True, save_every=1, steps=3)
    finetune(config(tiny_model_dir, run, "lora-ga", **best), progress=False, stop_after=2)
    assert (run / "checkpoints" / "step-0000002" / "best.safetensors").is_file()
    summary = resume(run, progress=False)
    assert summary["best"]["step"] >= 1 and (run / "best").is_dir()


def test_resume_refuses_a_finished_run_and_one_without_checkpoints(tiny_model_dir, tmp_path):
    finetune(config(tiny_model_dir, tmp_path / "done", "head"), progress=False)
    with pytest.raises(GradkitError, match="has finished"):
        resume(tmp_path / "done")
    finetune(config(tiny_model_dir, tmp_path / "early", "head"), progress=False, stop_after=1)
    with pytest.raises(GradkitError, match="no checkpoint"):
        resume(tmp_path / "early")
    with pytest.raises(GradkitError, match="no config.json"):
        resume(tmp_path / "missing")


def test_cli_resume_takes_no_other_option(tiny_model_dir, tmp_path, capsys):
    from gradkit.cli import main

    assert main(["finetune", "--resume", str(tmp_path), "--lr", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradkit: error: --resume takes its settings") and "--lr" in err
    assert len(err.splitlines()) == 1


TWO_PROCESS_SCRIPT = """
import sys
from gradkit.train.config import TrainConfig
from gradkit.train.loop import finetune, resume

model, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = TrainConfig(method="{method}", model=model, steps=5, batch_size=8, max_length=32, save_every=2, out=out)
if mode == "through":
    finetune(cfg, progress=False)
elif mode == "stop":
    finetune(cfg, progress=False, stop_after=3)
else:
    resume(out, progress=False)
"""


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", "mezo"])
def test_two_processes_resume_bit_identical(tiny_model_dir, tmp_path, method):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(TWO_PROCESS_SCRIPT.format(method=method)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def launch(out: str, mode: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += [str(script), str(tiny_model_dir), out, mode]
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    launch(str(tmp_path / "through"), "through")
    launch(str(tmp_path / "stopped"), "stop")
    launch(str(tmp_path / "stopped"), "resume")
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_identical"] is True
    assert summary["resumed_from_step"] == 2
    assert saved_bytes(tmp_path / "stopped") == saved_bytes(tmp_path / "through")
    assert train_rows(tmp_path / "stopped") == train_rows(tmp_path / "through")
