"""Every numeric and path option is checked before anything is loaded or written: one line naming the
option, the value and the allowed range, exit status 2, no traceback, no run folder."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest

from gradkit.cli import main

TINY = ("--steps", "1", "--batch-size", "4", "--max-length", "16")

BAD = {
    "lr-negative": (("--lr", "-1"), "--lr -1.0 is not allowed: it must be finite and > 0"),
    "lr-nan": (("--lr", "nan"), "--lr nan is not allowed"),
    "lr-nan-mezo": (("--lr", "nan", "--method", "mezo"), "--lr nan is not allowed"),
    "rank-zero": (("--rank", "0"), "--rank 0 is not allowed: it must be finite and >= 1"),
    "rank-negative": (("--rank", "-1"), "--rank -1 is not allowed"),
    "targets-empty": (("--targets", ""), "--targets '' names no layer"),
    "targets-commas": (("--targets", ",,"), "--targets ',,' names no layer"),
    "max-length-zero": (("--max-length", "0"), "--max-length 0 is not allowed"),
    "max-grad-norm-negative": (("--max-grad-norm", "-1"), "--max-grad-norm -1.0 is not allowed"),
    "warmup-ratio-above-one": (
        ("--warmup-ratio", "2"),
        "--warmup-ratio 2.0 is not allowed: it must be finite and in [0, 1]",
    ),
    "weight-decay-inf": (("--weight-decay", "inf"), "--weight-decay inf is not allowed"),
    "alpha-zero": (("--alpha", "0"), "--alpha 0.0 is not allowed"),
    "lora-dropout-one": (
        ("--lora-dropout", "1"),
        "--lora-dropout 1.0 is not allowed: it must be finite and in [0, 1)",
    ),
    "ema-one": (("--ema", "1"), "--ema 1.0 is not allowed"),
    "steps-zero": (("--steps", "0"), "--steps 0 is not allowed"),
    "seed-negative": (("--seed", "-3"), "--seed -3 is not allowed"),
    "seed-beyond-32-bits": (
        ("--seed", "4294967296"),
        "--seed 4294967296 is not allowed: it must be finite and in [0, 4294967296)",
    ),
    "model-missing": (("--model", "/nonexistent/model"), "--model /nonexistent/model is not a model folder"),
    "grad-accum-huge": (("--grad-accum", "1000000000"), "--grad-accum 1000000000 makes each step hold"),
    "grad-accum-zero": (("--grad-accum", "0"), "--grad-accum 0 is not allowed: it must be finite and >= 1"),
    "eval-every-negative": (("--eval-every", "-1"), "--eval-every -1 is not allowed"),
    "save-every-negative": (("--save-every", "-5"), "--save-every -5 is not allowed"),
    "dev-fraction-too-big": (("--dev-fraction", "0.9"), "--dev-fraction 0.9 is not allowed: it must be"),
    "eval-every-without-dev": (
        ("--eval-every", "10"),
        "--eval-every 10 needs a dev set (never the test set)",
    ),
    "keep-best-without-eval": (("--keep-best",), "--keep-best picks the best of the dev evaluations"),
    "dev-and-fraction": (("--dev", "d.tsv", "--dev-fraction", "0.1"), "--dev and --dev-fraction both"),
    "dev-missing": (("--dev", "/nonexistent/dev.tsv"), "/nonexistent/dev.tsv"),
    "schedule-with-steps": (
        ("--batch-schedule", "noise"),
        "--batch-schedule noise counts the budget in examples",
    ),
    "examples-and-steps": (("--examples", "8", "--steps", "5"), "--examples and --steps both set the budget"),
    "examples-not-whole-batches": (
        ("--examples", "10"),
        "--examples 10 is not a whole number of batches of 4",
    ),
    "examples-zero": (("--examples", "0"), "--examples 0 is not allowed"),
    "batch-max-below-batch": (
        ("--batch-schedule", "ramp", "--examples", "4", "--batch-max", "2"),
        "--batch-max 2 must be a multiple of the step's batch 4",
    ),
    "batch-max-not-a-multiple": (
        ("--batch-schedule", "noise", "--examples", "4", "--batch-max", "6"),
        "--batch-max 6 must be a multiple",
    ),
    "batch-max-beyond-the-data": (
        ("--batch-schedule", "noise", "--examples", "4", "--batch-max", "400000"),
        "--batch-max 400,000 is more than the",
    ),
    "batch-max-without-schedule": (
        ("--batch-max", "64"),
        "--batch-max applies to a growing --batch-schedule",
    ),
    "noise-fraction-zero": (("--batch-noise-fraction", "0"), "--batch-noise-fraction 0.0 is not allowed"),
    "noise-fraction-negative": (
        ("--batch-noise-fraction", "-1"),
        "--batch-noise-fraction -1.0 is not allowed",
    ),
    "batch-check-zero": (("--batch-check", "0"), "--batch-check 0 is not allowed"),
    "ramp-examples-without-ramp": (
        ("--batch-schedule", "noise", "--examples", "4", "--batch-ramp-examples", "8"),
        "--batch-ramp-examples sets --batch-schedule ramp's doublings",
    ),
    "schedule-with-mezo": (
        ("--batch-schedule", "noise", "--examples", "4", "--method", "mezo"),
        "mezo has none (zeroth order estimates its step",
    ),
    "schedule-with-policy-gradient": (
        ("--batch-schedule", "ramp", "--examples", "4", "--method", "policy-gradient"),
        "policy-gradient has none",
    ),
    "optimizer-with-lora-pro": (
        ("--optimizer", "muon", "--method", "lora-pro"),
        "--optimizer muon trains --method lora or full; --method lora-pro has its own optimiser",
    ),
    "schedule-free-with-a-growing-batch": (
        ("--optimizer", "schedule-free", "--method", "lora", "--batch-schedule", "ramp", "--examples", "4"),
        "which is AdamW's, not --optimizer schedule-free's",
    ),
    "muon-with-a-growing-batch": (
        ("--optimizer", "muon", "--method", "full", "--batch-schedule", "noise", "--examples", "8"),
        "--batch-schedule noise scales the lr by Adam's batch-size law",
    ),
    "noise-with-one-example": (
        ("--batch-schedule", "noise", "--examples", "1", "--batch-size", "1"),
        "needs at least 2 examples a step",
    ),
}


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradkit: error: "), err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("command", ["finetune", "compare"])
def test_bad_settings_stop_before_anything_is_written(tmp_path, monkeypatch, capsys, case, command):
    monkeypatch.chdir(tmp_path)
    args, fragment = BAD[case]
    if command == "compare":
        args = tuple(a if a != "--method" else "--methods" for a in args)
    code, err = run(capsys, command, *TINY, *args, "--out", str(tmp_path / "run"))
    assert_one_line(code, err, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_noise_scale_refuses_a_seed_outside_32_bits(tmp_path, monkeypatch, capsys, seed):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "noise-scale", *TINY, "--seed", seed, "--out", str(tmp_path / "run"))
    assert_one_line(code, err, f"--seed {seed} is not allowed")
    assert list(tmp_path.iterdir()) == []


def test_the_largest_32_bit_seed_is_accepted():
    from gradkit.train.config import TrainConfig
    from gradkit.train.settings import check_settings

    check_settings(TrainConfig(seed=2**32 - 1))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--max-length", "100000"), "--max-length 100000 exceeds the 128 positions of the model"),
        (("--rank", "10000"), "--rank 10000 exceeds min(in, out) = 32 of the smallest targeted layer"),
        (("--targets", "q_proj"), "--targets q_proj match no Linear layer"),
    ],
    ids=["max-length-beyond-positions", "rank-beyond-width", "unknown-target"],
)
def test_settings_the_model_decides_stop_before_anything_is_written(
    tmp_path, monkeypatch, capsys, tiny_model_dir, args, fragment
):
    monkeypatch.chdir(tmp_path)
    code, err = run(
        capsys, "finetune", "--model", str(tiny_model_dir), *TINY, *args, "--out", str(tmp_path / "r")
    )
    assert_one_line(code, err, fragment)
    assert list(tmp_path.iterdir()) == []


def test_out_is_refused_when_it_holds_files_and_cleared_with_overwrite(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_text("an earlier run's weights")
    args = ("finetune", "--method", "head", "--model", str(tiny_model_dir), *TINY, "--out", str(out))
    code, err = run(capsys, *args)
    assert_one_line(code, err, "already holds files")
    assert (out / "adapter" / "adapter_model.safetensors").read_text() == "an earlier run's weights"

    code, err = run(capsys, *args, "--overwrite")
    assert code == 0, err
    assert not (out / "adapter").exists()  # the head run's weights cannot be mixed up with the old adapter
    assert json.loads((out / "summary.json").read_text())["method"] == "head"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / "summary.json").stat().st_mode) == 0o666 & ~mask  # not owner-only

    (tmp_path / "file").write_text("x")
    code, err = run(capsys, *args[:-1], str(tmp_path / "file"))
    assert_one_line(code, err, "is a file")


@pytest.mark.parametrize("command", ["finetune", "compare", "diagnose"])
@pytest.mark.parametrize("where", ["folder-of-the-data", "above-the-data", "the-model-folder"])
def test_overwrite_never_clears_a_folder_holding_the_runs_inputs(
    tmp_path, monkeypatch, capsys, tiny_model_dir, command, where
):
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    rows = "sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(16))
    for name in ("train.tsv", "test.tsv"):
        (data / name).write_text(rows)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    monkeypatch.chdir(data)
    out, option = {"folder-of-the-data": (".", "--train"), "above-the-data": ("..", "--")}.get(
        where, (str(model), "--model")
    )
    files = (
        ("--train", "train.tsv") if command == "diagnose" else ("--train", "train.tsv", "--test", "test.tsv")
    )
    tail = ("--batches", "1") if command == "diagnose" else TINY
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, err = run(capsys, command, "--model", str(model), *files, *tail, "--out", out, "--overwrite")
    assert_one_line(code, err, f"--out {out} holds {option}")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_large_lora_rank_warns_and_a_small_one_does_not():
    import warnings

    from torch import nn

    from gradkit.train.config import TrainConfig
    from gradkit.train.validate import check_lora_rank

    model = nn.Sequential(nn.Linear(64, 64))  # 4,160 parameters
    with pytest.warns(UserWarning, match="trains 0.0 M parameters, 98% of the model"):
        check_lora_rank(TrainConfig(rank=32), model, ["0"])  # 32 * (64 + 64) = 4,096
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_lora_rank(TrainConfig(rank=4), model, ["0"])  # 512: 12%


def test_a_run_says_what_it_read(tmp_path, capsys, tiny_model_dir):
    code = main(
        ["finetune", "--method", "head", "--model", str(tiny_model_dir), *TINY, "--out", str(tmp_path / "r")]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert (
        "data: train " in out
        and "(4,000 rows), test " in out
        and "(872 rows); 2 classes: 0 = '0', 1 = '1'" in out
    )


def test_compare_keep_existing_adds_a_method_beside_other_runs(tmp_path, tiny_model_dir, capsys):
    """The benchmarks gather methods in one folder: with keep_existing only the method's own folder must
    be new (or, with overwrite, it alone is cleared); the CLI's rule for the whole folder is the default."""
    from gradkit.errors import GradkitError
    from gradkit.train.compare import compare
    from gradkit.train.config import TrainConfig

    out = tmp_path / "cmp"
    (out / "lora").mkdir(parents=True)
    (out / "lora" / "summary.json").write_text("{}")  # another method's finished run
    cfg = TrainConfig(model=str(tiny_model_dir), steps=1, batch_size=4, max_length=16, out=str(out))
    with pytest.raises(GradkitError, match="already holds files"):
        compare(cfg, ["head"])
    (out / "head").mkdir()
    (out / "head" / "partial.txt").write_text("a stopped run")
    with pytest.raises(GradkitError, match="already holds files"):
        compare(cfg, ["head"], keep_existing=True)
    (summary,) = compare(dataclasses.replace(cfg, overwrite=True), ["head"], keep_existing=True)
    assert "error" not in summary, summary
    assert (out / "lora" / "summary.json").read_text() == "{}"  # the other run is untouched
    assert not (out / "head" / "partial.txt").exists()


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tiny_model_dir):
    """A 2-layer GPT-2 (Conv1D layers, no nn.Linear) saved as a local folder, without tokenizer files."""
    import torch
    from transformers import GPT2Config, GPT2Model

    path = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        path
    )
    return path


def test_a_decoder_folder_is_checked_before_anything_is_written(
    tmp_path, monkeypatch, capsys, tiny_gpt2_dir, tiny_model_dir
):
    """No tokenizer files: transformers still builds a tokenizer, with no vocabulary; gradkit refuses it.
    With tokenizer files the harness runs GPT-2 with a head, and LoRA says why it cannot adapt Conv1D."""
    import shutil

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = (*TINY, "--out", str(cwd / "r"))
    code, err = run(capsys, "finetune", "--method", "head", "--model", str(tiny_gpt2_dir), *args)
    assert_one_line(code, err, "turns text into no tokens")
    with_tokenizer = tmp_path / "gpt2-with-tokenizer"
    shutil.copytree(tiny_gpt2_dir, with_tokenizer)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, with_tokenizer / name)
    code, err = run(capsys, "finetune", "--method", "lora", "--model", str(with_tokenizer), *args)
    assert_one_line(code, err, "no nn.Linear layers for LoRA to adapt (GPT-2-style models use Conv1D)")
    assert list(cwd.iterdir()) == []
    assert main(["finetune", "--method", "head", "--model", str(with_tokenizer), *args]) == 0


def test_a_tokenizer_without_a_pad_token_pads_with_end_of_text(tmp_path, tiny_model_dir):
    """Decoder tokenizers (GPT-2's) have no padding token: gradkit pads with the end-of-text token, and
    refuses one that has neither."""
    import shutil

    from torch import nn
    from transformers import AutoTokenizer

    from gradkit.errors import GradkitError
    from gradkit.train.config import TrainConfig
    from gradkit.train.model import load_tokenizer
    from gradkit.train.validate import check_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*token*", "vocab*"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token, tokenizer.eos_token = None, "[SEP]"
    tokenizer.save_pretrained(folder)
    loaded = load_tokenizer(str(folder))
    assert loaded.pad_token == "[SEP]"
    assert loaded(["a", "a longer text"], padding=True)["input_ids"][0][-1] == loaded.convert_tokens_to_ids(
        "[SEP]"
    )
    loaded.pad_token = loaded.eos_token = None
    with pytest.raises(GradkitError, match="no padding token"):
        check_model(TrainConfig(max_length=16), nn.Linear(2, 2), loaded, str(folder))


def test_an_empty_out_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "finetune", *TINY, "--out", "")
    assert_one_line(code, err, "--out is empty")
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a),
    )
    code, err = run(capsys, "finetune", *TINY, "--report-to", "tensorboard")
    assert_one_line(
        code, err, "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, package",
    [(("--optimizer", "schedule-free"), "schedulefree"), (("--method", "lora-rite"), "pytorch_optimizer")],
)
def test_a_peer_without_its_package_is_one_line(tmp_path, monkeypatch, capsys, args, package):
    """The optional peers name the extra to install, before anything is loaded or written."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "finetune", *TINY, *args, "--out", str(tmp_path / "run"))
    assert_one_line(code, err, f"needs the {package} package: pip install 'gradkit[peers]'")
    assert list(tmp_path.iterdir()) == []
