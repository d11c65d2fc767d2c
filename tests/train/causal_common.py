"""Tiny random causal LMs (Llama and GPT-2 configs built with ``from_config``, no download), saved as
local folders with a word-level tokenizer built here from Tiny Shakespeare's words, and prompt/response
JSON lines made of consecutive Shakespeare lines (a line as the prompt, the next as the response)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare" / "input.txt"


def shakespeare_lines(n: int, start: int = 0) -> list[str]:
    """``n`` non-blank lines of Tiny Shakespeare from the ``start``-th non-blank one."""
    lines = [line for line in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[start : start + n]


def pairs_file(path: Path, rows: int, start: int = 0) -> Path:
    """``rows`` JSON lines ``{"prompt": line i + "\\n", "response": line i + 1}``."""
    lines = shakespeare_lines(rows + 1, start)
    with path.open("w", encoding="utf-8") as f:
        for prompt, response in zip(lines[:-1], lines[1:], strict=True):
            f.write(json.dumps({"prompt": prompt + "\n", "response": response}) + "\n")
    return path


def word_tokenizer(bos: bool):
    """A word-level ``PreTrainedTokenizerFast`` over the words of the first 2,000 lines: ``<unk>``,
    ``<pad>``, ``<s>``, ``</s>``; with ``bos`` it puts ``<s>`` before every text (Llama's habit) and
    has a pad token, without it neither (GPT-2's habit: gradkit pads with ``</s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in shakespeare_lines(2000) for w, _ in _split(line)})
    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)]
        )
    kwargs = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if bos:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _split(line: str):
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Whitespace().pre_tokenize_str(line)


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(bos=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = word_tokenizer(bos=False)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=2,
        eos_token_id=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
