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


BRANCH_RUN = ["--steps", "8", "--batch-size", "8", "--micro-batches", "4", "--max-length", "16"]
# seed 2 at lr 1e-2: the tiny model's B_simple is measurable at step 8 (15.6)
BRANCH_RUN += ["--lr", "1e-2", "--seed", "2", "--beta", "0.5", "--dev-fraction", "0.05"]
BRANCH_RUN += ["--branch", "8,32,16", "--branch-drop", "0.01", "--branch-examples", "512"]
BRANCH_RUN += ["--branch-eval-examples", "32"]


def test_branch_measures_the_critical_batch_from_the_runs_end(tiny_model_dir, tmp_path, capsys):
    from gradkit.scaling import critical_batch_size, lr_for_batch
    from gradkit.scaling.critical_batch import steps_to_target

    runs = []
    for name in ("a", "b"):
        argv = ["noise-scale", "--model", str(tiny_model_dir), *BRANCH_RUN, "--out", str(tmp_path / name)]
        assert main(argv) == 0
        runs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    record = runs[0]["branches"]
    assert runs[1]["branches"] == record  # the same command, the same branches, bit for bit
    assert record["batches"] == [8, 16, 32] and record["b_simple"] == runs[0]["b_simple"]
    assert record["target"] == pytest.approx(0.99 * record["held_out_loss"])
    # each branch's lr from Adam's law at the measured B_simple, the run's own batch at the run's lr
    b = record["b_simple"]
    expected = [lr_for_batch(1e-2, 8, n, optimizer="adam", kappa=b**0.5, b_noise=b) for n in (8, 16, 32)]
    assert record["lr"] == pytest.approx(expected) and record["lr"][0] == pytest.approx(1e-2)
    for n, steps in zip(record["batches"], record["steps"], strict=True):
        curve = record["curves"][str(n)]
        assert curve[0] == [0.0, record["held_out_loss"]]  # every branch starts from the run's end
        assert steps == steps_to_target(curve, record["target"])
        assert curve[-1][0] <= 512 // n  # within --branch-examples
        every = round(32 / n) or 1
        assert [s for s, _ in curve[1:]] == [float(every * i) for i in range(1, len(curve))]
    again = critical_batch_size(record["batches"], record["steps"])
    assert record["critical_text"] == again.describe() and record["critical_batch"] == again.value
    assert (tmp_path / "a" / "branches.png").stat().st_size > 1000
    assert "critical batch (20% rule)" in capsys.readouterr().out


def test_branches_leave_the_run_as_it_stood(tiny_model_dir, tmp_path):
    """After the branches the model and optimiser hold the branch point's state again."""
    import torch

    from gradkit.train.branches import Branches, BranchPlan
    from gradkit.train.config import TrainConfig
    from gradkit.train.loop import finetune

    seen = {}

    def branch(run):
        before = {k: v.clone() for k, v in run.unwrapped.state_dict().items()}
        moments = [s["exp_avg"].clone() for s in run.optimizer.state_dict()["state"].values()]
        plan = BranchPlan((4, 8), drop=0.5, max_examples=16, eval_examples=4, optimizer="adam")
        seen["record"] = Branches(run, plan, b_simple=10.0).measure(progress=False)
        after = run.unwrapped.state_dict()
        seen["weights"] = all(torch.equal(before[k], after[k]) for k in before)
        now = [s["exp_avg"] for s in run.optimizer.state_dict()["state"].values()]
        seen["moments"] = all(torch.equal(a, c) for a, c in zip(moments, now, strict=True))

    cfg = TrainConfig(
        model=str(tiny_model_dir),
        method="full",
        steps=2,
        batch_size=4,
        max_length=16,
        dev_fraction=0.05,
        schedule="constant",
        evaluate=False,
        out=str(tmp_path / "run"),
    )
    finetune(cfg, progress=False, after_train=branch)
    assert seen["weights"] and seen["moments"]
    # a 50% lower loss is out of reach in 16 examples: neither branch reaches it, so no size measures it
    assert seen["record"]["steps"] == [None, None] or seen["record"]["critical_batch"] is None


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--branch", "16", "--dev-fraction", "0.1"], "at least two different batch sizes"),
        (["--branch", "16,x", "--dev-fraction", "0.1"], "at least two different batch sizes"),
        (["--branch", "0,16", "--dev-fraction", "0.1"], "at least two different batch sizes"),
        (["--branch", "16,8192", "--dev-fraction", "0.1"], "raise --branch-examples to at least 8192"),
        (["--branch", "16,32"], "--dev-fraction 0.1 or --dev FILE"),
        (["--branch-drop", "0.1"], "act only with --branch"),
        (["--branch", "16,32", "--dev-fraction", "0.1", "--branch-drop", "1"], "--branch-drop"),
        (["--branch", "16,32", "--dev-fraction", "0.1", "--branch-examples", "0"], "--branch-examples"),
    ],
)
def test_branch_bad_input_is_one_line_exit_2(extra, match, tmp_path, capsys):
    assert main(["noise-scale", "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradkit: error:") and match in err and "\n" not in err
    assert not (tmp_path / "x").exists()
