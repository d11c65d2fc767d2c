"""`gradkit noise-scale` on the tiny model: a few steps, metrics, table, plots; bad input exits 2."""

from __future__ import annotations

import json

import pytest

from gradkit.cli import main


def test_noise_scale_cli_runs_and_writes_plots(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ns"
    argv = ["noise-scale", "--model", str(tiny_model_dir), "--steps", "4", "--batch-size", "8"]
    argv += ["--micro-batches", "4", "--max-length", "16", "--lr", "1e-3", "--beta", "0.5", "--out", str(out)]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(r["b_simple"] is None or r["b_simple"] > 0 for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert (out / "noise_scale.png").stat().st_size > 1000
    # seed 0 on the tiny model: measurable from step 2 (step 1's |G|^2 estimate is negative)
    assert lines[0]["b_simple"] is None and summary["b_simple"] > 0
    assert [r["batch"] for r in summary["table"]] == [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert summary["table"][0]["sgd_lr"] == pytest.approx(1e-3)  # the known-good point
    assert summary["table"][0]["adam_lr"] == pytest.approx(1e-3)
    assert (out / "lr_vs_batch.png").exists() and (out / "steps_examples.png").exists()
    assert "4096" in printed and "Adam lr" in printed
    # the harness' loop ran it: its run folder, its checks, a constant lr, no test evaluation
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "noise-scale" and config["schedule"] == "constant" and not config["evaluate"]
    assert (out / "labels.json").exists() and all(r["lr"] == pytest.approx(1e-3) for r in lines)
    assert "test_accuracy" not in summary and summary["train_examples"] == 4000
    assert main([*argv]) == 2  # --out now holds a run: refused, as for finetune
    assert "already holds files" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--micro-batches", "1"], "at least 2"),
        (["--batch-size", "10", "--micro-batches", "4"], "multiple of"),
        (["--lr", "-1"], "positive learning rate"),
        (["--beta", "1.5"], "--beta"),
    ],
)
def test_noise_scale_cli_bad_input_is_one_line_exit_2(extra, match, tmp_path, capsys):
    assert main(["noise-scale", "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradkit: error:") and match in err and "\n" not in err
