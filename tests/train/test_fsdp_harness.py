"""``gradkit finetune --fsdp`` under torchrun (2 processes, gloo on CPU) on the tiny BERT: lora (with an
EMA, and with spectral steepest descent or Schedule-Free as its optimiser), lora-pro and full fine-tuning finish with the model sharded, their saved weights reload and score the test
set as summary.json says, they equal the same runs without --fsdp (DDP), and a stopped --fsdp run
resumes to the same bytes.

Every run of the test is one launch: a driver calls the CLI's ``main`` once per command line (the
same code as ``python -m gradkit finetune ...``), which saves four interpreter and process-group
start-ups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gradkit.errors import GradkitError
from gradkit.train.config import TrainConfig

SST2 = Path(__file__).parents[2] / "src" / "gradkit" / "data" / "sst2"

DRIVER = """
import json, os, sys
from gradkit.cli import main
from gradkit.train.loop import finetune, resume

for argv in json.loads(sys.argv[1]):
    if argv[0] == "stop":  # finetune(..., stop_after=N), then resume: a stopped run continued
        from gradkit.cli import build_parser
        from gradkit.cli.finetune import config_from_args as _config

        args = build_parser().parse_args(["finetune", *argv[2:]])
        finetune(_config(args, args.method), progress=False, stop_after=int(argv[1]))
        resume(args.out, progress=False)
    elif main(argv) != 0:
        sys.exit(f"failed: {argv}")
# every run ended (and accelerate destroyed the group); skip the interpreter teardown, where torch
# 2.13's gloo backend now and then aborts (see tests/fsdp/fsdp_common.exit_without_teardown)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""

# state tolerance: the two runs differ only in how the gradient mean is reduced (reduce-scatter of
# rows vs all-reduce; exact for 2 ranks) and clip with the same norm (gradkit.fsdp.clip_grad_norm_)
TOLERANCE = 1e-6
# a large share of B_simple: the tiny run's noise schedule grows within its few steps
NOISE_FRACTION = 30


def _common(model: Path, out: Path, method: str) -> list[str]:
    args = ["finetune", "--method", method, "--model", str(model), "--steps", "4", "--batch-size", "8"]
    args += ["--max-length", "32", "--out", str(out)]
    args += ["--train", str(out.parent / "train.tsv"), "--test", str(out.parent / "test.tsv")]
    return args + (["--ema", "0.9"] if method == "lora" else [])


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp-harness")
    for split, rows in (("train", 64), ("test", 128)):  # small files: the launch is the test's time
        lines = (SST2 / f"{split}.tsv").read_text().splitlines(keepends=True)
        (root / f"{split}.tsv").write_text("".join(lines[: rows + 1]))
    lines = []
    for method in ("lora", "full", "lora-pro"):
        lines.append(
            [*_common(tiny_model_dir, root / f"{method}-fsdp", method), "--fsdp", "--save-every", "2"]
        )
        lines.append(_common(tiny_model_dir, root / f"{method}-ddp", method))
    for name, optimizer in (("lora-spectral", "steepest-spectral"), ("lora-schedule-free", "schedule-free")):
        for parallel in ("fsdp", "ddp"):
            line = [*_common(tiny_model_dir, root / f"{name}-{parallel}", "lora"), "--optimizer", optimizer]
            lines.append(line + (["--fsdp"] if parallel == "fsdp" else []))
    factor = ["--pro-moments", "factor"]  # LoRA-Pro's other form of its moments
    lines.append([*_common(tiny_model_dir, root / "lora-pro-factor-fsdp", "lora-pro"), *factor, "--fsdp"])
    lines.append([*_common(tiny_model_dir, root / "lora-pro-factor-ddp", "lora-pro"), *factor])
    lines.append(
        [
            "stop",
            "3",
            *_common(tiny_model_dir, root / "lora-resumed", "lora")[1:],
            "--fsdp",
            "--save-every",
            "2",
        ]
    )
    best = ["--keep-best", "--dev", str(root / "test.tsv"), "--eval-every", "1"]
    lines.append([*_common(tiny_model_dir, root / "lora-best-fsdp", "lora"), *best, "--fsdp"])
    lines.append([*_common(tiny_model_dir, root / "lora-best-ddp", "lora"), *best])
    lines.append([*_common(tiny_model_dir, root / "mezo-fsdp", "mezo"), "--fsdp", "--save-every", "2"])
    stopped = _common(tiny_model_dir, root / "mezo-resumed", "mezo")[1:]
    lines.append(["stop", "3", *stopped, "--fsdp", "--save-every", "2"])
    svrg = [
        "--zo-estimator",
        "svrg",
        "--zo-svrg-every",
        "3",
        "--zo-svrg-batches",
        "2",
        "--fsdp",
        "--save-every",
        "2",
    ]
    lines.append([*_common(tiny_model_dir, root / "svrg-fsdp", "mezo"), *svrg])
    lines.append(["stop", "3", *_common(tiny_model_dir, root / "svrg-resumed", "mezo")[1:], *svrg])
    for name, parallel in (("noise-fsdp", ["--fsdp"]), ("noise-ddp", [])):
        common = _common(tiny_model_dir, root / name, "full")
        noise = ["--examples", "96", "--batch-schedule", "noise", "--batch-check", "1"]
        noise += ["--batch-noise-fraction", str(NOISE_FRACTION), "--batch-max", "32"]
        lines.append([arg for arg in common if arg not in ("--steps", "4")] + noise + parallel)
    driver = root / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(driver), json.dumps(lines)]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def _weights(run: Path, sub: str = "") -> dict:
    from safetensors.torch import load_file

    folder = run / sub
    path = folder / "adapter" / "adapter_model.safetensors"
    return load_file(str(path if path.is_file() else folder / "trainable.safetensors"))


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", "full", "lora-pro"])
def test_fsdp_run_finishes_sharded_with_identical_ranks(runs, method):
    fsdp = json.loads((runs / f"{method}-fsdp" / "summary.json").read_text())
    ddp = json.loads((runs / f"{method}-ddp" / "summary.json").read_text())
    assert fsdp["status"] == "finished" and fsdp["fsdp"] is True and ddp["fsdp"] is False
    assert fsdp["num_processes"] == 2 and fsdp["ranks_identical"] is True
    if method == "lora-pro":
        # LoRAPro keeps its projected moments whole on every rank (O(r(in+out)) per layer, see
        # docs/fsdp.md); only the head's AdamW moments are sharded: 86,280 vs 86,544 bytes measured
        assert (
            0.9 * ddp["optimizer_state_bytes"] < fsdp["optimizer_state_bytes"] <= ddp["optimizer_state_bytes"]
        )
    else:  # each rank holds about half of the optimiser state (its rows of every moment), DDP all of it
        assert fsdp["optimizer_state_bytes"] < 0.6 * ddp["optimizer_state_bytes"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "method", ["lora", "full", "lora-pro", "lora-pro-factor", "lora-spectral", "lora-schedule-free"]
)
def test_fsdp_weights_equal_the_ddp_runs(runs, method):
    """The --fsdp run's weights equal the DDP run's. LoRA-Pro's projected step amplifies any difference
    in the gradients it is given (from B = 0, Adam's slope of about 1/eps at an entry below eps, and A's
    step B^+ D with B of the size of the lr): a clipping scale differing in its last bit between the
    runs made A differ by 1.7e-3 after 4 steps, which is why both runs clip by the whole gradients'
    norm (gradkit.fsdp.clip_grad_norm_)."""
    for sub in ("", "ema") if method == "lora" else ("",):
        fsdp, ddp = _weights(runs / f"{method}-fsdp", sub), _weights(runs / f"{method}-ddp", sub)
        assert fsdp.keys() == ddp.keys() and len(fsdp) > 1
        diff = max((fsdp[k] - ddp[k]).abs().max().item() for k in fsdp)
        assert diff <= TOLERANCE, (sub, diff)  # measured: 0 for all six (and lora's EMA)
    fsdp = json.loads((runs / f"{method}-fsdp" / "summary.json").read_text())
    ddp = json.loads((runs / f"{method}-ddp" / "summary.json").read_text())
    assert abs(fsdp["test_loss"] - ddp["test_loss"]) < 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", "full", "lora-pro"])
def test_fsdp_saved_weights_reload_and_score_as_the_summary_says(runs, method):
    from gradkit.data import load_label_map, load_text_classification
    from gradkit.train.evaluate import evaluate_texts
    from gradkit.train.reload import load_trained

    run = runs / f"{method}-fsdp"
    summary = json.loads((run / "summary.json").read_text())
    names = load_label_map(run / "labels.json")
    test = load_text_classification(str(runs / "test.tsv"), split="test", label_names=names)
    for which, expected in [("final", summary)] + ([("ema", summary["ema"])] if method == "lora" else []):
        model, tokenizer = load_trained(run, which)
        got = evaluate_texts(model, test, tokenizer, 32)
        assert got["test_accuracy"] == expected["test_accuracy"], which
        assert abs(got["test_loss"] - expected["test_loss"]) < 1e-6, which


@pytest.mark.distributed
def test_a_stopped_fsdp_run_resumes_to_the_same_bytes(runs):
    """The checkpoint holds whole tensors (tensors.safetensors, as without --fsdp) and each rank's
    shards of the optimiser and EMA state (rng-rank{r}.pt)."""
    from gradkit.train.checkpoint import latest_checkpoint

    resumed, through = runs / "lora-resumed", runs / "lora-fsdp"
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 2
    for sub in ("", "ema"):
        assert (resumed / sub / "adapter" / "adapter_model.safetensors").read_bytes() == (
            through / sub / "adapter" / "adapter_model.safetensors"
        ).read_bytes()
    assert latest_checkpoint(through) is not None


def test_fsdp_is_refused_in_one_process(monkeypatch):
    from gradkit.train.validate import check_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(GradkitError, match="--fsdp shards the model over several processes"):
        check_config(TrainConfig(fsdp=True))


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"method": "lora", "optimizer": "muon"}, "torch.optim.Muon orthogonalises each rank's rows"),
        ({"method": "lora-rite"}, "LoRARite does not take FSDP2's sharded factors"),
    ],
)
def test_fsdp_refuses_the_peers_that_cannot_run_sharded(settings, fragment):
    """Muon runs on FSDP2's shards but orthogonalises each rank's rows (a 2-process lora run ended 8e-5
    away from DDP's); LoRARite fails on DTensors."""
    from gradkit.train.validate import check_fsdp

    with pytest.raises(GradkitError, match=fragment):
        check_fsdp(TrainConfig(fsdp=True, **settings), processes=2)


@pytest.mark.distributed
def test_fsdp_keep_best_equals_the_ddp_run(runs):
    """--keep-best under --fsdp: the same dev step is chosen, and best/ holds the same weights (the
    weights are kept and put back by name after dev evaluations, where FSDP2 leaves the root's
    unsharded parameters registered)."""
    fsdp = json.loads((runs / "lora-best-fsdp" / "summary.json").read_text())
    ddp = json.loads((runs / "lora-best-ddp" / "summary.json").read_text())
    # the best dev step (1 of 4) is not the last, so best/ comes from weights put back after training
    assert fsdp["best"]["step"] == ddp["best"]["step"] < 4
    assert abs(fsdp["best"]["test_loss"] - ddp["best"]["test_loss"]) < 1e-5
    got, want = _weights(runs / "lora-best-fsdp", "best"), _weights(runs / "lora-best-ddp", "best")
    assert got.keys() == want.keys() and len(got) > 1
    assert max((got[k] - want[k]).abs().max().item() for k in got) <= TOLERANCE


@pytest.mark.distributed
@pytest.mark.parametrize("estimator", ["spsa", "svrg"])
def test_a_stopped_fsdp_mezo_run_resumes_to_the_same_bytes(runs, estimator):
    """spsa keeps no optimiser state, only its seed stream: a resumed sharded run redraws the same
    perturbations. svrg, stopped between anchors, also reloads each rank's shards of its anchor θ̄."""
    resumed, through = (
        (runs / "mezo-resumed", runs / "mezo-fsdp")
        if estimator == "spsa"
        else (
            runs / "svrg-resumed",
            runs / "svrg-fsdp",
        )
    )
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 2
    got, want = _weights(resumed), _weights(through)
    assert got.keys() == want.keys() and len(got) > 1
    assert all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.distributed
def test_a_noise_schedule_under_fsdp_grows_as_under_ddp(runs):
    """FSDP2 reads each rank's gradient on its unsharded parameters, DDP before its all-reduce: the same
    noise scale, the same growths, the same weights."""
    fsdp = json.loads((runs / "noise-fsdp" / "summary.json").read_text())
    ddp = json.loads((runs / "noise-ddp" / "summary.json").read_text())
    assert fsdp["ranks_identical"] is True and fsdp["examples"] == ddp["examples"] == 96
    grown, ddp_grown = fsdp["batch_schedule"]["changes"], ddp["batch_schedule"]["changes"]
    assert grown and [(c["step"], c["batch"]) for c in grown] == [(c["step"], c["batch"]) for c in ddp_grown]
    for mine, theirs in zip(grown, ddp_grown, strict=True):
        assert mine["b_simple"] == pytest.approx(theirs["b_simple"], rel=1e-4)
    weights, ddp_weights = _weights(runs / "noise-fsdp"), _weights(runs / "noise-ddp")
    assert max((weights[k] - ddp_weights[k]).abs().max().item() for k in weights) <= TOLERANCE
