"""The fine-tuning harness on a tiny random BERT: run folder, data order, methods, adapter round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradkit.train.config import TrainConfig
from gradkit.train.datasets import training_order
from gradkit.train.loop import finetune
from gradkit.train.methods import get_method

ROOT = Path(__file__).resolve().parents[2]


def small_config(tiny_model_dir, tmp_path, **overrides) -> TrainConfig:
    values = dict(model=str(tiny_model_dir), steps=4, batch_size=8, max_length=32, out=str(tmp_path / "run"))
    values.update(overrides)
    return TrainConfig(**values)


def test_finetune_writes_complete_run_folder(tiny_model_dir, tmp_path):
    summary = finetune(small_config(tiny_model_dir, tmp_path, method="lora"), progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "labels.json", "metrics.jsonl", "summary.json", "loss.png"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(set(r) == {"step", "loss", "lr", "seconds"} for r in rows)
    # linear warmup (ceil(0.1 * 4) = 1 step) then linear decay to zero
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-3)
    assert rows[2]["lr"] == pytest.approx(1e-3 * 2 / 3) and rows[3]["lr"] == pytest.approx(1e-3 / 3)
    saved = json.loads((run / "summary.json").read_text())
    assert saved["test_examples"] == 872 and saved["train_examples"] == 4000
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    # AdamW: fp32 exp_avg and exp_avg_sq per weight, plus a scalar fp32 step per tensor (12 LoRA A/B pairs + head)
    assert saved["optimizer_state_bytes"] == 2 * 4 * saved["trainable_parameters"] + 4 * (2 * 12 + 2)
    assert summary["final_train_loss"] == pytest.approx(sum(r["loss"] for r in rows) / 4)
    assert json.loads((run / "labels.json").read_text())["label_names"] == ["0", "1"]


def test_data_order_is_seeded_and_covers_each_example_once_per_epoch():
    from gradkit.data import load_text_classification

    data = load_text_classification(None, split="train")
    first = training_order(len(data), 2 * len(data) + 5, seed=3)
    assert first == training_order(len(data), 2 * len(data) + 5, seed=3)
    assert first != training_order(len(data), 2 * len(data) + 5, seed=4)
    n = len(data)
    assert sorted(first[:n]) == list(range(n)) and sorted(first[n : 2 * n]) == list(range(n))
    assert first[:n] != first[n : 2 * n]  # a fresh shuffle each epoch


def test_head_method_trains_only_the_head(tiny_model_dir, tmp_path):
    from gradkit.train.model import load_classifier

    cfg = small_config(tiny_model_dir, tmp_path, method="head")
    before = load_classifier(str(tiny_model_dir), 2, seed=0).state_dict()
    finetune(cfg, progress=False)
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "run" / "trainable.safetensors"))
    assert set(trained) == {"head.weight", "head.bias"}
    assert not torch.equal(trained["head.weight"], before["head.weight"])


def test_every_method_starts_from_the_same_model(tiny_model_dir):
    from gradkit.train.model import load_classifier

    a, b = load_classifier(str(tiny_model_dir), 3, seed=7), load_classifier(str(tiny_model_dir), 3, seed=7)
    state = torch.get_rng_state()
    c = load_classifier(str(tiny_model_dir), 3, seed=8)
    assert torch.equal(torch.get_rng_state(), state)  # the head is drawn from a private generator
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    assert a.head.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_lora_targets_every_encoder_linear(tiny_classifier):
    from peft.tuners.lora import Linear as LoraLinear

    model = get_method("lora").prepare(tiny_classifier, TrainConfig(), batches=[])
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert len(adapted) == 2 * 6  # per layer: query, key, value, attention output, intermediate, output
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".head." in n for n in trainable)
    assert any(".head." in n for n in trainable)


def test_saved_adapter_loads_onto_the_base_with_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from gradkit.train.model import load_classifier, load_tokenizer

    method = get_method("lora")
    model = method.prepare(load_classifier(str(tiny_model_dir), 2, seed=0), TrainConfig(rslora=True), [])
    with torch.no_grad():  # a trained-looking adapter: B non-zero, head changed
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    method.save(model, tmp_path)
    tok = load_tokenizer(str(tiny_model_dir))
    batch = tok(["a gripping , funny film", "dull"], padding=True, return_tensors="pt")
    model.eval()
    expected = model(**batch).logits
    loaded = PeftModel.from_pretrained(
        load_classifier(str(tiny_model_dir), 2, seed=123), tmp_path / "adapter"
    )
    loaded.eval()
    assert (loaded(**batch).logits - expected).abs().max().item() <= 1e-5


def test_unknown_method_lists_the_choices():
    from gradkit.errors import GradkitError

    with pytest.raises(GradkitError, match="unknown method 'nope'.*full.*head.*lora"):
        get_method("nope")


def test_lora_targets_are_checked(tiny_classifier):
    from gradkit.errors import GradkitError
    from gradkit.train.model import lora_target_names

    assert lora_target_names(tiny_classifier, "query,value") == ["query", "value"]
    with pytest.raises(GradkitError, match="q_proj match no Linear.*dense, key, query, value"):
        lora_target_names(tiny_classifier, "q_proj")


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "method, saved", [("lora", "adapter/adapter_model.safetensors"), ("full", "trainable.safetensors")]
)
def test_ema_runs_alongside_without_changing_training(tiny_model_dir, tmp_path, method, saved):
    from safetensors.torch import load_file

    plain = finetune(small_config(tiny_model_dir, tmp_path / "plain", method=method), progress=False)
    # decay 0: the average is the latest weights, so "EMA" evaluation and files equal the raw ones exactly
    zero = finetune(small_config(tiny_model_dir, tmp_path / "zero", method=method, ema=0.0), progress=False)
    slow = finetune(
        small_config(tiny_model_dir, tmp_path / "slow", method=method, ema=0.9, ema_warmup=None),
        progress=False,
    )
    assert "ema" not in plain
    assert (
        _losses(tmp_path / "plain" / "run")
        == _losses(tmp_path / "zero" / "run")
        == _losses(tmp_path / "slow" / "run")
    )
    assert zero["test_accuracy"] == plain["test_accuracy"] == slow["test_accuracy"]
    assert zero["ema"]["test_loss"] == zero["test_loss"]
    raw = load_file(str(tmp_path / "zero" / "run" / saved))
    averaged = load_file(str(tmp_path / "zero" / "run" / "ema" / saved))
    assert raw.keys() == averaged.keys() and all(torch.equal(raw[k], averaged[k]) for k in raw)
    # decay 0.9 without warmup keeps 0.9^4 of the initial weights: a different model, evaluated separately
    assert slow["ema"]["decay"] == 0.9 and slow["ema"]["test_loss"] != slow["test_loss"]
    slow_avg = load_file(str(tmp_path / "slow" / "run" / "ema" / saved))
    slow_raw = load_file(str(tmp_path / "slow" / "run" / saved))
    assert any(not torch.equal(slow_raw[k], slow_avg[k]) for k in slow_raw)
    assert json.loads((tmp_path / "slow" / "run" / "summary.json").read_text())["ema"]["warmup"] is None


def test_ema_dev_rows_score_the_average(tiny_model_dir, tmp_path):
    """With a dev set, each dev row also scores the EMA weights (``dev_ema_*``): at decay 0 the average is
    the latest weights, so the two agree exactly; with the test file as the dev file the last row's average
    scores what the summary's EMA test does; training is unchanged."""
    rows = (ROOT / "data" / "sst2" / "dev.tsv").read_text().splitlines()[:25]
    small = tmp_path / "small.tsv"
    small.write_text("\n".join(rows) + "\n")
    common = dict(method="lora", test=str(small), dev=str(small), eval_every=2)
    finetune(small_config(tiny_model_dir, tmp_path / "zero", ema=0.0, **common), progress=False)
    slow = finetune(
        small_config(tiny_model_dir, tmp_path / "slow", ema=0.9, ema_warmup=None, **common), progress=False
    )
    finetune(small_config(tiny_model_dir, tmp_path / "plain", **common), progress=False)

    def dev_rows(name: str) -> list[dict]:
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        return [row for row in map(json.loads, lines) if "dev_loss" in row]

    assert [r["step"] for r in dev_rows("slow")] == [2, 4]
    assert all(r["dev_ema_loss"] == r["dev_loss"] for r in dev_rows("zero"))
    assert all("dev_ema_loss" not in r for r in dev_rows("plain"))
    last = dev_rows("slow")[-1]
    assert (
        last["dev_ema_loss"] == slow["ema"]["test_loss"]
        and last["dev_ema_accuracy"] == slow["ema"]["test_accuracy"]
    )
    assert last["dev_ema_loss"] != last["dev_loss"]
    train_rows = [_train_losses(tmp_path / name / "run") for name in ("slow", "plain")]
    assert train_rows[0] == train_rows[1]


def _train_losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


def test_ema_decay_is_checked_before_anything_is_written(tiny_model_dir, tmp_path):
    from gradkit.errors import GradkitError

    with pytest.raises(GradkitError, match="--ema 1.5"):
        finetune(small_config(tiny_model_dir, tmp_path, ema=1.5), progress=False)
    assert not (tmp_path / "run").exists()
