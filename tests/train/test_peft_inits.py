"""PEFT's LoRA initialisations as harness methods (pissa, olora, eva, corda): each adapter loads onto the
ORIGINAL base with plain PEFT and scores the test set as the run did, each initialisation is its own
(not plain LoRA's), the data passes leave the global RNG alone, and a stopped run resumes bit for bit."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import torch

from gradkit.train.config import TrainConfig
from gradkit.train.methods.peft_inits import single_texts
from gradkit.train.tokenize import PAIR_PREFIX

METHODS = ("pissa", "olora", "eva", "corda")
DATA = Path(__file__).resolve().parents[2] / "data"


def config(tiny_model_dir, out, method: str, **extra) -> TrainConfig:
    return TrainConfig(
        method=method,
        model=str(tiny_model_dir),
        steps=3,
        batch_size=8,
        max_length=32,
        rank=4,
        lr=1e-3,
        out=str(out),
        options={"peft_init_batches": 2},
        **extra,
    )


@pytest.mark.parametrize("method", METHODS)
def test_the_adapter_loads_onto_the_original_base_with_plain_peft(tiny_model_dir, tmp_path, method):
    from peft import PeftModel

    from gradkit.train.datasets import load_datasets
    from gradkit.train.evaluate import evaluate_texts
    from gradkit.train.loop import finetune
    from gradkit.train.model import load_classifier, load_tokenizer

    cfg = config(tiny_model_dir, tmp_path / "run", method)
    summary = finetune(cfg, progress=False)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] is True
    loaded = PeftModel.from_pretrained(load_classifier(str(tiny_model_dir), 2, seed=7), adapter)
    _, _, test = load_datasets(cfg)
    again = evaluate_texts(loaded, test, load_tokenizer(str(tiny_model_dir)), 32, 256)
    assert again["test_loss"] == pytest.approx(summary["test_loss"], abs=1e-5)
    assert again["test_accuracy"] == summary["test_accuracy"]


def _prepared(tiny_model_dir, method: str, **options):
    from gradkit.train.datasets import load_datasets
    from gradkit.train.methods import get_method
    from gradkit.train.model import load_classifier, load_tokenizer
    from gradkit.train.tokenize import tokenize

    cfg = TrainConfig(model=str(tiny_model_dir), rank=4, options={"peft_init_batches": 2, **options})
    train, _, _ = load_datasets(cfg)
    tokens = tokenize(load_tokenizer(str(tiny_model_dir)), train.texts, train.labels, 32)
    batches = iter([tokens.collate(range(8 * k, 8 * k + 8)) for k in range(3)])
    base = load_classifier(str(tiny_model_dir), 2, seed=0)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    return get_method(method).prepare(base, cfg, batches), original


@pytest.mark.parametrize("method", METHODS)
def test_each_initialisation_is_its_own(tiny_model_dir, method):
    """pissa, olora and corda start with B != 0 and a residual base (the adapted model still computes
    the original function); eva keeps B = 0 and the base, with A not plain LoRA's Kaiming draw: its rows
    are orthonormal (singular vectors of the inputs). The global RNG is left alone."""
    before = torch.random.get_rng_state()
    model, original = _prepared(tiny_model_dir, method)
    assert torch.equal(torch.random.get_rng_state(), before)
    named = dict(model.named_parameters())
    As = [p for n, p in named.items() if "lora_A" in n]
    Bs = [p for n, p in named.items() if "lora_B" in n]
    bases = [(n, p) for n, p in named.items() if n.endswith("base_layer.weight")]
    assert As and Bs and bases
    changed = [
        not torch.equal(p, original[n.replace("base_model.model.", "").replace(".base_layer", "")])
        for n, p in bases
    ]
    if method == "eva":
        assert all(b.abs().max() == 0 for b in Bs) and not any(changed)
        for a in As:
            torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
    else:
        assert all(b.abs().max() > 0 for b in Bs) and all(changed)


def test_eva_redistributes_ranks_up_to_rho_times_the_rank(tiny_model_dir):
    model, _ = _prepared(tiny_model_dir, "eva", eva_rho=2.0)
    ranks = [p.shape[0] for n, p in model.named_parameters() if "lora_A" in n]
    assert max(ranks) <= 8 and sum(ranks) <= 4 * len(ranks)  # the budget is rank x layers


def test_single_texts_drop_the_padding_on_either_side_and_the_label():
    batch = {
        "input_ids": torch.tensor([[5, 6, 0], [0, 7, 8]]),
        "attention_mask": torch.tensor([[1, 1, 0], [0, 1, 1]]),
        "labels": torch.tensor([1, 0]),
    }
    rows = list(single_texts([batch]))
    assert [r["input_ids"].tolist() for r in rows] == [[[5, 6]], [[7, 8]]]
    assert all(set(r) == {"input_ids", "attention_mask"} for r in rows)


def test_single_texts_give_a_pairs_second_text_by_its_own_mask():
    batch = {
        "input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
        PAIR_PREFIX + "input_ids": torch.tensor([[9, 0, 0], [3, 4, 2]]),
        PAIR_PREFIX + "attention_mask": torch.tensor([[1, 0, 0], [1, 1, 1]]),
        "labels": torch.tensor([0.5, 4.0]),
    }
    rows = list(single_texts([batch]))
    assert [r["input_ids"].tolist() for r in rows] == [[[5, 6]], [[7]], [[9]], [[3, 4, 2]]]
    assert [r["attention_mask"].tolist() for r in rows] == [[[1, 1]], [[1]], [[1]], [[1, 1, 1]]]


def test_corda_of_a_bi_encoder_reads_each_text_alone(tiny_model_dir):
    """The covariance pass runs the encoder on one text at a time (PEFT's hook reads one sequence), so a
    bi-encoder, whose forward encodes both texts of every pair at once, gets CorDA's residual init."""
    from gradkit.train.bi_encoder import PairSetup, Pooling, load_bi_encoder
    from gradkit.train.methods import get_method
    from gradkit.train.model import load_tokenizer
    from gradkit.train.tokenize import tokenize_bi

    with open(DATA / "stsb" / "train.tsv", encoding="utf-8", newline="") as f:
        rows = list(itertools.islice(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 16))
    tokens = tokenize_bi(
        load_tokenizer(str(tiny_model_dir)),
        [r["sentence1"] for r in rows],
        [r["sentence2"] for r in rows],
        [float(r["score"]) for r in rows],
        32,
    )
    setup = PairSetup("bi", "test", Pooling("mean", True, "t"), "mse")
    model = load_bi_encoder(str(tiny_model_dir), 2, setup, task="regression", labels=[0.0, 5.0])
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(model=str(tiny_model_dir), rank=4, task="regression", options={"peft_init_batches": 2})
    batches = iter([tokens.collate(range(8 * k, 8 * k + 8)) for k in range(2)])
    prepared = get_method("corda").prepare(model, cfg, batches)
    named = dict(prepared.named_parameters())
    bases = [(n, p) for n, p in named.items() if n.endswith("base_layer.weight")]
    assert bases and all(p.abs().max() > 0 for n, p in named.items() if "lora_B" in n)
    for n, p in bases:  # the base is the residual W - s·B A
        assert not torch.equal(p, original[n.replace("base_model.model.", "").replace(".base_layer", "")])


@pytest.mark.parametrize("method", ["pissa", "eva"])
def test_a_stopped_and_resumed_run_ends_bit_identical(tiny_model_dir, tmp_path, method):
    from gradkit.train.loop import finetune, resume

    def cfg(name: str):
        c = config(tiny_model_dir, tmp_path / name / "run", method)
        c.steps, c.save_every = 4, 2
        return c

    through = finetune(cfg("through"), progress=False)
    finetune(cfg("stopped"), progress=False, stop_after=3)
    again = resume(tmp_path / "stopped" / "run", progress=False)
    assert again["resumed_from_step"] == 2
    name = "adapter/adapter_model.safetensors"
    assert (tmp_path / "through" / "run" / name).read_bytes() == (
        tmp_path / "stopped" / "run" / name
    ).read_bytes()
    assert again["final_train_loss"] == through["final_train_loss"]


def test_eva_resume_rebuilds_the_ranks_it_chose(tiny_model_dir):
    """EVA's ranks are the method's state: from them alone (no data) a resumed run shapes every layer."""
    from gradkit.lora.pairs import lora_pairs
    from gradkit.train.methods import get_method
    from gradkit.train.model import load_classifier

    model, _ = _prepared(tiny_model_dir, "eva")
    names = [pair.name for pair in lora_pairs(model)]
    chosen = {name: 2 + 2 * (i % 3) for i, name in enumerate(names)}  # 2, 4, 6, ...: not the uniform 4
    method = get_method("eva")
    method.load_state_dict({"rank_pattern": chosen})
    assert method.state_dict() == {"rank_pattern": chosen}
    cfg = TrainConfig(model=str(tiny_model_dir), rank=4, method="eva")
    resumed = method.prepare_for_resume(load_classifier(str(tiny_model_dir), 2, seed=0), cfg)
    assert {pair.name: pair.A.shape[0] for pair in lora_pairs(resumed)} == chosen
