"""``peft-lora-ga``, PEFT's own LoRA-GA as a harness method (the peer in the LoRA-GA benchmarks)."""

from __future__ import annotations

import pytest
import torch

from gradkit.train.config import TrainConfig


def test_peft_lora_ga_run_saves_an_adapter_for_the_original_base(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from gradkit.train.datasets import load_datasets
    from gradkit.train.evaluate import evaluate_texts
    from gradkit.train.loop import finetune
    from gradkit.train.model import load_classifier, load_tokenizer

    cfg = TrainConfig(
        method="peft-lora-ga",
        model=str(tiny_model_dir),
        steps=3,
        batch_size=8,
        max_length=32,
        rank=4,
        lr=1e-3,
        out=str(tmp_path / "run"),
        options={"peft_ga_batches": 2},
    )
    summary = finetune(cfg, progress=False)
    # PEFT's conversion turns the trained change against the ORIGINAL base into a rank-2r adapter
    loaded = PeftModel.from_pretrained(
        load_classifier(str(tiny_model_dir), 2, seed=7), tmp_path / "run" / "adapter"
    )
    assert loaded.peft_config["default"].r == 2 * cfg.rank
    _, _, test = load_datasets(cfg)
    again = evaluate_texts(loaded, test, load_tokenizer(str(tiny_model_dir)), 32, 256)
    assert again["test_loss"] == pytest.approx(summary["test_loss"], abs=1e-5)
    assert again["test_accuracy"] == summary["test_accuracy"]


def test_peft_lora_ga_init_is_not_a_plain_lora_init(tiny_model_dir):
    """B is non-zero after PEFT's LoRA-GA, and the global RNG is left alone."""
    from gradkit.train.datasets import load_datasets
    from gradkit.train.methods import get_method
    from gradkit.train.model import load_classifier, load_tokenizer
    from gradkit.train.tokenize import tokenize

    cfg = TrainConfig(model=str(tiny_model_dir), rank=4, options={"peft_ga_batches": 2})
    train, _, _ = load_datasets(cfg)
    tokens = tokenize(load_tokenizer(str(tiny_model_dir)), train.texts, train.labels, 32)
    batches = iter([tokens.collate(range(8 * k, 8 * k + 8)) for k in range(2)])
    before = torch.random.get_rng_state()
    model = get_method("peft-lora-ga").prepare(load_classifier(str(tiny_model_dir), 2, seed=0), cfg, batches)
    assert torch.equal(torch.random.get_rng_state(), before)
    bs = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert bs and all(b.abs().max() > 0 for b in bs)
