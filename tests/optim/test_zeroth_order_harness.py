"""The ``mezo`` and ``policy-gradient`` harness methods on a tiny random BERT."""

from __future__ import annotations

import json

import pytest
import torch

from gradkit.errors import GradkitError
from gradkit.train.config import TrainConfig
from gradkit.train.loop import finetune
from gradkit.train.methods.zeroth_order import objective_value
from gradkit.train.metrics import accuracy, macro_f1


def small_config(tiny_model_dir, tmp_path, method: str, **options) -> TrainConfig:
    return TrainConfig(
        method=method,
        model=str(tiny_model_dir),
        steps=3,
        batch_size=8,
        max_length=32,
        out=str(tmp_path / "run"),
        options=options,
    )


def test_cli_finetune_mezo_writes_a_run_folder(tiny_model_dir, tmp_path, capsys):
    from gradkit.cli import main

    out = tmp_path / "run"
    args = ["finetune", "--method", "mezo", "--model", str(tiny_model_dir), "--steps", "3"]
    status = main([*args, "--batch-size", "8", "--max-length", "32", "--out", str(out), "--zo-eps", "1e-2"])
    assert status in (0, None)
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # LoRA + head by default
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["zo_params"] == "lora" and config["options"]["zo_eps"] == 1e-2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_state_bytes"] == 0  # nothing per parameter: the seed trick
    assert "mezo: test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("objective", ["accuracy", "f1"])
def test_mezo_optimises_a_metric_of_every_weight_without_backward(
    tiny_model_dir, tmp_path, objective, monkeypatch
):
    from gradkit.train.model import load_classifier

    def no_backward(*args, **kwargs):
        raise AssertionError("mezo must not call backward")

    monkeypatch.setattr(torch.autograd, "backward", no_backward)

    before = load_classifier(str(tiny_model_dir), 2, seed=0).state_dict()
    cfg = small_config(tiny_model_dir, tmp_path, "mezo", zo_params="all", objective=objective, zo_samples=2)
    cfg.lr = 1e-2
    summary = finetune(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["loss"] <= 1.0 for r in rows)  # 1 - metric of the batch
    assert summary["trainable_parameters"] == sum(t.numel() for t in before.values())
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "trainable.safetensors"))
    changed = [k for k, v in saved.items() if not torch.equal(v, before[k])]
    assert "encoder.embeddings.word_embeddings.weight" in changed and "head.weight" in changed


def test_policy_gradient_trains_the_head_and_logs_the_error_rate(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from gradkit.train.model import load_classifier

    before = load_classifier(str(tiny_model_dir), 2, seed=0).state_dict()
    cfg = small_config(tiny_model_dir, tmp_path, "policy-gradient", zo_params="head", pg_temperature=0.5)
    finetune(cfg, progress=False)
    saved = load_file(str(tmp_path / "run" / "trainable.safetensors"))
    assert set(saved) == {"head.weight", "head.bias"}
    assert not torch.equal(saved["head.weight"], before["head.weight"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["loss"] <= 1.0 for r in rows)


class _OneProcess:
    """accelerate's single-process reduce: the identity."""

    def reduce(self, tensor, reduction="mean"):
        return tensor.clone()


def test_objective_values_match_the_metrics():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    preds = logits.argmax(-1)
    acc = objective_value(logits, labels, "accuracy", _OneProcess(), None)
    f1 = objective_value(logits, labels, "f1", _OneProcess(), None)
    assert acc.item() == pytest.approx(1 - accuracy(preds, labels))
    assert f1.item() == pytest.approx(1 - macro_f1(preds, labels, 3))
    loss = torch.tensor(0.7)
    assert objective_value(logits, labels, "loss", _OneProcess(), loss).item() == pytest.approx(0.7)


def test_mezo_run_survives_a_step_the_optimiser_skips(tiny_model_dir, tmp_path, monkeypatch):
    """A non-finite loss inside a ZerothOrder step skips that step (counted), not the whole run."""
    import gradkit.train.methods.zeroth_order as zo_method

    calls = {"n": 0}
    real = zo_method.objective_value

    def nan_on_step_two(*args, **kwargs):  # the closure runs twice per step: calls 3 and 4 are step 2
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(zo_method, "objective_value", nan_on_step_two)
    cfg = small_config(tiny_model_dir, tmp_path, "mezo", zo_params="head")
    with pytest.warns(UserWarning, match="step skipped"):
        summary = finetune(cfg, progress=False)
    assert summary["skipped_steps"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 3]


def test_a_run_with_no_finite_loss_fails_with_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    """Every step skipped (fewer than max_bad_steps, so the optimiser itself does not raise): the run
    has nothing to report and fails instead of writing NaN results."""
    import gradkit.train.methods.zeroth_order as zo_method

    real = zo_method.objective_value
    monkeypatch.setattr(zo_method, "objective_value", lambda *a, **k: real(*a, **k) * float("nan"))
    cfg = small_config(tiny_model_dir, tmp_path, "mezo", zo_params="head")
    with (
        pytest.warns(UserWarning, match="step skipped"),
        pytest.raises(GradkitError, match="not finite in any"),
    ):
        finetune(cfg, progress=False)
    assert not (tmp_path / "run" / "summary.json").exists()
