"""Shared fixtures: a tiny random BERT (hidden size 32) with the real MiniLM tokenizer, saved as a
local Hugging Face folder, so unit tests exercise the real loading path in well under a second."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"  # the data sets the tests read (source, rows and format in data/README.md)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT with hidden size 32 and MiniLM's vocabulary and tokenizer files."""
    import torch
    from transformers import BertConfig, BertModel

    from gradkit.train.model import default_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    src = Path(default_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, path / name)
    return path


@pytest.fixture
def tiny_classifier(tiny_model_dir):
    from gradkit.train.model import load_classifier

    return load_classifier(str(tiny_model_dir), num_labels=2, seed=0)
