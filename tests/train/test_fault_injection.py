"""Faults injected into a checkpointed run: every file a resume reads truncated, emptied, overwritten
with garbage, deleted or with one byte flipped is refused in one line naming it (exit 2, no traceback,
the run folder unchanged), before any model is loaded; a full disk during a checkpoint leaves the
previous checkpoint intact and resumable to the bytes of an uninterrupted run; SIGTERM records
``stopped`` with how to resume; a running run's folder is locked against a second run or a resume;
a non-finite test loss is flagged, not reported as a result."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradkit.cli import main
from gradkit.errors import GradkitError
from gradkit.train.config import TrainConfig
from gradkit.train.loop import finetune, resume

DATA = Path(__file__).resolve().parents[2] / "data"

STEP = "step-0000002"
DAMAGED_FILES = [
    "checkpoints/latest.json",
    f"checkpoints/{STEP}/manifest.json",
    f"checkpoints/{STEP}/tensors.safetensors",
    f"checkpoints/{STEP}/state.pt",
    f"checkpoints/{STEP}/rng-rank0.pt",
    "config.json",
    "status.json",
]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(bytes((i * 167 + 13) % 256 for i in range(size)))


def _delete(path: Path) -> None:
    path.unlink()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF  # inside the tensor data of a weight file
    path.write_bytes(bytes(data))


FAULTS = {"truncate": _truncate, "empty": _empty, "garbage": _garbage, "delete": _delete, "flip": _flip}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    """32 training and 16 test rows of SST-2: a run of a few steps in a few seconds."""
    folder = tmp_path_factory.mktemp("data")
    lines = (DATA / "sst2" / "train.tsv").read_text().splitlines()
    (folder / "train.tsv").write_text("\n".join(lines[:33]) + "\n")
    (folder / "test.tsv").write_text("\n".join([lines[0], *lines[33:49]]) + "\n")
    return folder / "train.tsv", folder / "test.tsv"


def config(tiny_model_dir, data_files, out: Path, **overrides) -> TrainConfig:
    train, test = data_files
    values = dict(
        method="lora",
        model=str(tiny_model_dir),
        train=str(train),
        test=str(test),
        steps=4,
        batch_size=4,
        max_length=16,
        save_every=2,
        out=str(out),
    )
    values.update(overrides)
    return TrainConfig(**values)


def cli_args(tiny_model_dir, data_files, out: Path, *extra: str) -> list[str]:
    train, test = data_files
    args = ["finetune", "--method", "lora", "--model", str(tiny_model_dir), "--train", str(train)]
    args += ["--test", str(test), "--steps", "4", "--batch-size", "4", "--max-length", "16"]
    return [*args, "--save-every", "2", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def stopped_run(tiny_model_dir, data_files, tmp_path_factory) -> Path:
    """One run stopped after step 3, its checkpoint at step 2: every case damages a copy of it."""
    out = tmp_path_factory.mktemp("runs") / "stopped"
    finetune(config(tiny_model_dir, data_files, out), progress=False, stop_after=3)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    """The ``gradkit:`` lines of stderr (the progress bar shares it); none may be a traceback's."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("gradkit:")]


def weight_bytes(run: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(run).items() if k.endswith(".safetensors") and "checkpoints" not in k}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("name", DAMAGED_FILES)
def test_a_damaged_file_is_refused_in_one_line(stopped_run, tmp_path, capsys, monkeypatch, name, fault):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    FAULTS[fault](run / name)
    before = snapshot(run)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the damage was found")

    monkeypatch.setattr("gradkit.train.loop.load_classifier", no_model)
    assert main(["finetune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("gradkit: error: ") and "Traceback" not in err
    assert Path(name).name in err, err
    assert snapshot(run) == before


def test_a_deleted_pointer_offers_the_intact_checkpoint_which_resumes(
    stopped_run, tiny_model_dir, data_files, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    (run / "checkpoints" / "latest.json").unlink()
    assert main(["finetune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "without --save-every" not in err and f"--resume {run / 'checkpoints' / STEP}" in err
    resume(run / "checkpoints" / STEP, progress=False)  # what the line says to do
    through = tmp_path / "through"
    finetune(config(tiny_model_dir, data_files, through), progress=False)
    assert weight_bytes(run) == weight_bytes(through) and weight_bytes(run)


def test_a_full_disk_mid_checkpoint_keeps_the_previous_one(
    tiny_model_dir, data_files, tmp_path, capsys, monkeypatch
):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step-0000004" in str(f) and str(f).endswith("state.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    run = tmp_path / "run"
    args = cli_args(tiny_model_dir, data_files, run)
    args[args.index("--steps") + 1] = "5"  # checkpoints at steps 2 and 4
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        assert main(args) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "No space left on device" in err, err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "No space left" in status["reason"]
    assert status["checkpoint_step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", STEP]

    resume(run, progress=False)
    through = tmp_path / "through"
    finetune(config(tiny_model_dir, data_files, through, steps=5), progress=False)
    assert weight_bytes(run) == weight_bytes(through) and weight_bytes(run)


def test_a_full_disk_at_the_final_save_is_one_line(tiny_model_dir, data_files, tmp_path, capsys, monkeypatch):
    from gradkit.train.methods.lora import Lora

    def full_disk(self, model, out):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "adapter_model.safetensors"))

    run = tmp_path / "run"
    monkeypatch.setattr(Lora, "save", full_disk)
    assert main(cli_args(tiny_model_dir, data_files, run)) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "No space left on device" in err, err
    assert f"--resume {run}" in err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "No space left" in status["reason"]


def _wait_for_a_checkpoint(run: Path, proc: subprocess.Popen, seconds: float) -> None:
    """Wait until the running ``proc`` has written a checkpoint into ``run`` (its status names one)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status_path = run / "status.json"
        if status_path.is_file() and json.loads(status_path.read_text()).get("checkpoint_step"):
            return
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.2)


def test_sigterm_is_a_stop_and_a_running_run_is_locked(tiny_model_dir, data_files, tmp_path, capsys):
    run = tmp_path / "run"
    args = cli_args(tiny_model_dir, data_files, run)
    args[args.index("--steps") + 1] = "100000"
    args[args.index("--save-every") + 1] = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradkit", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for_a_checkpoint(run, proc, seconds=120)
        config_before = (run / "config.json").read_bytes()
        for refused in (["finetune", "--resume", str(run)], [*args, "--overwrite", "--seed", "1"]):
            assert main(refused) == 2
            err = capsys.readouterr().err
            assert "another gradkit run is writing" in err and len(err.strip().splitlines()) == 1, err
        assert (run / "config.json").read_bytes() == config_before
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped" and "SIGTERM" in status["reason"]
    assert f"--resume {run}" in status["reason"]


def test_a_second_run_that_finds_the_folder_written_is_refused(tiny_model_dir, data_files, tmp_path):
    from gradkit.train.run_folder import RunFolder

    cfg = config(tiny_model_dir, data_files, tmp_path / "run")
    (tmp_path / "run").mkdir()  # a run with the same --out that started later but got here first
    (tmp_path / "run" / "config.json").write_text('{"seed": 1}')
    with pytest.raises(GradkitError, match="another run wrote that folder"):
        RunFolder(tmp_path / "run", steps=4).create(cfg, 1e-3, 1, None)


def test_a_non_finite_test_loss_is_flagged(tiny_model_dir, data_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "gradkit.train.loop.evaluate", lambda *a, **k: {"test_loss": math.nan, "test_accuracy": 0.5}
    )
    run = tmp_path / "run"
    args = cli_args(tiny_model_dir, data_files, run)
    assert main(args) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "WARNING non_finite" in line and "final" in line
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["warning"].startswith("non_finite")
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["warning"] == summary["warning"]


def test_a_config_changed_since_the_checkpoint_is_refused(stopped_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    settings = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**settings, "seed": settings["seed"] + 1}))
    before = snapshot(run)
    assert main(["finetune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "differs" in err and len(err.strip().splitlines()) == 1
    assert snapshot(run) == before


KILLED_RANK_SCRIPT = """
import os, sys
from pathlib import Path
Path(sys.argv[1], f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
from gradkit.train.config import TrainConfig
from gradkit.train.loop import finetune
model, train, test, out = sys.argv[2:6]
cfg = TrainConfig(method="lora", model=model, train=train, test=test, steps=100000, batch_size=4,
                  max_length=16, save_every=1, out=out)
finetune(cfg, progress=False)
"""


@pytest.mark.distributed
def test_a_killed_rank_leaves_an_honest_status(tiny_model_dir, data_files, tmp_path):
    """SIGKILL one of two data-parallel processes: the job ends and status.json is not left ``running``."""
    script = tmp_path / "run.py"
    script.write_text(KILLED_RANK_SCRIPT)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    cmd += [str(tmp_path), str(tiny_model_dir), *map(str, data_files), str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_a_checkpoint(run, proc, seconds=180)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    status = json.loads((run / "status.json").read_text())
    assert status["status"] in ("failed", "stopped") and status["reason"], status
