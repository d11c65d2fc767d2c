"""--optimizer: which tensors each part trains, the spectral step in closed form, Schedule-Free tested and
saved at its averaged weights, and LoRA-RITE's adapter loading in plain PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from gradkit.lora.pairs import lora_pairs
from gradkit.optim.combined import CombinedOptimizer
from gradkit.train.config import TrainConfig
from gradkit.train.loop import finetune
from gradkit.train.methods import get_method
from gradkit.train.model import load_classifier
from gradkit.train.optimizers import build_optimizer, optimizer_split, rms_match


def _lora_model(tiny_model_dir):
    cfg = TrainConfig(model=str(tiny_model_dir), rank=2)
    return get_method("lora").prepare(load_classifier(str(tiny_model_dir), 2, seed=0), cfg, iter(())), cfg


@pytest.mark.parametrize("name", ["muon", "steepest-spectral"])
def test_the_matrices_are_the_lora_factors_and_adamw_takes_the_head(tiny_model_dir, name):
    model, cfg = _lora_model(tiny_model_dir)
    optimizer = build_optimizer(model, TrainConfig(model=cfg.model, rank=2, optimizer=name), 1e-3)
    assert isinstance(optimizer, CombinedOptimizer)
    matrices, rest = ([p for g in o.param_groups for p in g["params"]] for o in optimizer.optimizers)
    names = {id(p): n for n, p in model.named_parameters()}
    assert matrices and all("lora_A" in names[id(p)] or "lora_B" in names[id(p)] for p in matrices)
    assert {names[id(p)].split(".")[-4] for p in rest} == {"head"}  # head.modules_to_save.default.*
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(part["parameters"] for part in optimizer_split(optimizer)) == trainable


def test_full_fine_tuning_keeps_embeddings_and_head_on_adamw(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), 2, seed=0)
    optimizer = build_optimizer(model, TrainConfig(model=str(tiny_model_dir), optimizer="muon"), 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = [names[id(p)] for g in optimizer.optimizers[0].param_groups for p in g["params"]]
    two_d = [n for n, p in model.named_parameters() if p.ndim == 2]
    assert sorted(matrices) == sorted(n for n in two_d if "embeddings" not in n and not n.startswith("head."))
    assert any("embeddings" in n for n in two_d) and "head.weight" in two_d


def test_the_spectral_step_is_the_scaled_orthogonal_factor(tiny_model_dir):
    """First step, no decay: Δ = −lr·0.2·√max(m, n)·U Vᵀ of the gradient (Nesterov's g + μg has the same
    U Vᵀ), Moonlight's match to AdamW's update RMS."""
    model, cfg = _lora_model(tiny_model_dir)
    settings = TrainConfig(model=cfg.model, rank=2, optimizer="steepest-spectral", weight_decay=0.0)
    optimizer = build_optimizer(model, settings, 1e-2)
    matrices = [p for group in optimizer.optimizers[0].param_groups for p in group["params"]]
    assert len({p.shape for p in matrices}) > 1  # factors of several shapes, stepped in shape batches
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) if p.requires_grad else None
    before = [(p.detach().clone(), p.grad.clone()) for p in matrices]
    optimizer.step()
    for matrix, (start, grad) in zip(matrices, before, strict=True):
        u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
        expected = start - 1e-2 * rms_match(matrix.shape) * (u @ vh).float()
        assert torch.allclose(matrix, expected, atol=1e-6)
        # U Vᵀ of an m×n gradient has RMS 1/√max(m, n): the scaled step's RMS is AdamW's typical 0.2·lr
        assert (matrix - start).pow(2).mean().sqrt().item() == pytest.approx(0.2 * 1e-2, rel=1e-4)


def test_schedule_free_is_tested_and_saved_at_its_averaged_weights(tiny_model_dir, tmp_path):
    seen = {}

    def averaged(run):  # the weights a Schedule-Free run trains at (y) and its average (x)
        inner = run.optimizer.optimizer
        seen["y"] = {k: v.clone() for k, v in run.unwrapped.state_dict().items()}
        inner.eval()
        seen["x"] = {k: v.clone() for k, v in run.unwrapped.state_dict().items()}
        inner.train()

    cfg = TrainConfig(
        model=str(tiny_model_dir),
        method="full",
        optimizer="schedule-free",
        steps=4,
        batch_size=8,
        max_length=16,
        out=str(tmp_path / "run"),
    )
    finetune(cfg, progress=False, after_train=averaged)
    saved = load_file(tmp_path / "run" / "trainable.safetensors")
    moved = [k for k in saved if not torch.equal(seen["x"][k], seen["y"][k])]
    assert moved  # x and y differ after 4 steps
    from_x = max((saved[k] - seen["x"][k]).abs().max().item() for k in moved)
    from_y = max((saved[k] - seen["y"][k]).abs().max().item() for k in moved)
    assert from_x <= 1e-6 < 1e-5 < from_y  # x up to the eval/train round trip's rounding, not y


def test_a_lora_rite_adapter_loads_in_plain_peft(tiny_model_dir, tmp_path):
    from gradkit.train.datasets import load_datasets
    from gradkit.train.evaluate import evaluate_texts
    from gradkit.train.model import load_tokenizer

    cfg = TrainConfig(
        model=str(tiny_model_dir),
        method="lora-rite",
        steps=3,
        batch_size=8,
        max_length=32,
        out=str(tmp_path / "run"),
    )
    summary = finetune(cfg, progress=False)
    assert [part["optimizer"] for part in summary["optimizer_split"]] == ["LoRARite", "AdamW"]
    loaded = PeftModel.from_pretrained(
        load_classifier(str(tiny_model_dir), 2, seed=7), tmp_path / "run" / "adapter"
    )
    pairs = [factor for pair in lora_pairs(loaded) for factor in (pair.A, pair.B)]
    assert len(pairs) % 2 == 0 and pairs[0].shape[0] == cfg.rank == pairs[1].shape[1]
    _, _, test = load_datasets(cfg)
    again = evaluate_texts(loaded, test, load_tokenizer(str(tiny_model_dir)), 32, 256)
    assert again["test_loss"] == pytest.approx(summary["test_loss"], abs=1e-5)
