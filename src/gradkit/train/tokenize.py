"""Tokenisation, done once per data set: every text (or text pair, or prompt/response pair) becomes
token ids without padding, with its label, and a batch is padded when it is formed (``collate``).

Classification and regression keep one label per example. A causal LM gets per-token labels in Hugging
Face's convention: ``labels`` has the shape of ``input_ids``, the model shifts them (position t's
logits predict the token at t + 1) and ignores ``IGNORE_INDEX``; prompt positions, padding and position
0 (which nothing predicts) carry it, so the loss is the mean cross-entropy over the response tokens
(every token of plain texts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradkit.errors import GradkitError

IGNORE_INDEX = -100  # label of positions without a loss (Hugging Face's and torch's ignore_index)

# the keys of a batch that hold one value per token position (sliced when padding is trimmed)
PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# a bi-encoder batch (:class:`BiTokenized`) holds the second texts of its pairs under these keys
PAIR_PREFIX = "pair_"
PAIR_PER_TOKEN = tuple(PAIR_PREFIX + key for key in PER_TOKEN)


@dataclass
class Tokenized:
    """Texts tokenised once (no padding), with their labels (class ids, or float targets for
    regression): a batch is ``collate(indices)``."""

    features: list[dict[str, list[int]]]
    labels: list[int] | list[float]
    pad_id: int
    padding_side: str
    label_dtype: torch.dtype = torch.long

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The examples at ``indices`` padded on the right to the longest of them, whatever the
        tokenizer's ``padding_side``: models that number positions from a row's start (GPT-2, Llama)
        see a left-padded row's tokens at shifted positions (see :mod:`gradkit.train.batching`)."""
        rows = [self.features[i] for i in indices]
        batch = pad_features(rows, self.pad_id, "right")
        batch["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=self.label_dtype)
        return batch


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] | Sequence[float],
    max_length: int,
    pairs: Sequence[str] | None = None,
) -> Tokenized:
    """Tokenise every text (or text pair, in the tokenizer's pair encoding: ``[CLS] a [SEP] b [SEP]``
    with segment ids for BERT) once, truncated to ``max_length`` (a pair loses tokens from its longer
    text first); padding happens per batch. Float labels (regression targets) stay floats."""
    if pairs is None:
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    else:
        encoded = tokenizer(list(texts), list(pairs), truncation="longest_first", max_length=max_length)
    keys = [k for k in PER_TOKEN if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
    return _with_labels(Tokenized, features, labels, tokenizer)


def _with_labels(kind: type, features: list[dict[str, list[int]]], labels: Sequence[Any], tokenizer: Any):
    """``kind`` (:class:`Tokenized` or a subclass) of ``features`` and ``labels``: float labels
    (regression targets) stay floats, the tokenizer's padding id and side are kept."""
    floats = any(isinstance(v, float) for v in labels)
    return kind(
        features,
        list(labels),
        int(tokenizer.pad_token_id),
        tokenizer.padding_side,
        torch.float32 if floats else torch.long,
    )


@dataclass
class BiTokenized(Tokenized):
    """Sentence pairs for a bi-encoder: each text tokenised on its own, the second ones under
    :data:`PAIR_PREFIX` keys; a batch pads the first and the second texts each to their own longest."""

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) + len(f[PAIR_PREFIX + "input_ids"]) for f in self.features]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.features[i] for i in indices]
        first = [{k: v for k, v in r.items() if not k.startswith(PAIR_PREFIX)} for r in rows]
        second = [{k[len(PAIR_PREFIX) :]: v for k, v in r.items() if k.startswith(PAIR_PREFIX)} for r in rows]
        batch = pad_features(first, self.pad_id, "right")
        batch.update({PAIR_PREFIX + k: v for k, v in pad_features(second, self.pad_id, "right").items()})
        batch["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=self.label_dtype)
        return batch


def tokenize_bi(
    tokenizer: Any, texts: Sequence[str], pairs: Sequence[str], labels: Sequence[Any], max_length: int
) -> BiTokenized:
    """Tokenise both texts of every pair separately (``[CLS] a [SEP]`` and ``[CLS] b [SEP]`` for BERT),
    each truncated to ``max_length``, for a bi-encoder (:mod:`gradkit.train.bi_encoder`)."""
    first = tokenizer(list(texts), truncation=True, max_length=max_length)
    second = tokenizer(list(pairs), truncation=True, max_length=max_length)
    keys = [k for k in PER_TOKEN if k in first]
    features = [
        {**{k: first[k][i] for k in keys}, **{PAIR_PREFIX + k: second[k][i] for k in keys}}
        for i in range(len(texts))
    ]
    return _with_labels(BiTokenized, features, labels, tokenizer)


def tokenize_data(tokenizer: Any, data: Any, max_length: int, pair_encoding: str = "cross") -> Tokenized:
    """:func:`tokenize` a loaded data set (:class:`gradkit.data.TextClassificationData`), pairs and all:
    a pair as one sequence (``pair_encoding="cross"``) or each text on its own (``"bi"``,
    :func:`tokenize_bi`); causal-LM data (:class:`gradkit.data.causal.CausalLMData`) go to
    :func:`tokenize_causal` (per-token labels)."""
    if getattr(data, "task", None) == "causal-lm":
        return tokenize_causal(tokenizer, data, max_length)
    pairs = getattr(data, "pairs", None)
    if pair_encoding == "bi" and pairs is not None:
        tokens = tokenize_bi(tokenizer, data.texts, pairs, data.labels, max_length)
    else:
        tokens = tokenize(tokenizer, data.texts, data.labels, max_length, pairs)
    if getattr(data, "task", "classification") == "regression":
        tokens.label_dtype = torch.float32  # targets written as integers ("4") are still targets
    return tokens


def pad_features(
    rows: Sequence[dict[str, list[int]]], pad_id: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Stack token lists into tensors padded to the longest row: ``input_ids`` with ``pad_id``, the
    attention mask and the other per-token keys with 0, on the left or the right."""
    longest = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        data = torch.full((len(rows), longest), fill, dtype=torch.long)
        for i, row in enumerate(rows):
            values = torch.tensor(row[key], dtype=torch.long)
            if side == "left":
                data[i, longest - len(values) :] = values
            else:
                data[i, : len(values)] = values
        out[key] = data
    return out


@dataclass
class CausalTokenized(Tokenized):
    """Token ids of every example and their per-token labels (``IGNORE_INDEX`` where there is no
    loss); ``collate`` pads on the right (real tokens then never see padding, whatever the
    attention implementation, and positions start at 0 in every row)."""

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.features[i] for i in indices]
        batch = pad_features(rows, self.pad_id, "right")
        labels = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
        for j, i in enumerate(indices):
            labels[j, : len(self.labels[i])] = torch.tensor(self.labels[i], dtype=torch.long)
        batch["labels"] = labels
        return batch

    def label_tokens(self) -> int:
        """Positions with a loss, over every example."""
        return sum(sum(1 for t in row if t != IGNORE_INDEX) for row in self.labels)


def framing(tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(before, after)``: the special tokens the tokenizer puts around a single text (BOS for Llama;
    nothing for GPT-2; [CLS] and [SEP] for BERT), with the end-of-text token appended to ``after``
    when the tokenizer has one and does not already end with it (a response then learns to stop)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    before: list[int] = []
    after: list[int] = []
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            before, after = list(full[:start]), list(full[start + len(plain) :])
            break
    eos = tokenizer.eos_token_id
    if eos is not None and (not after or after[-1] != eos):
        after.append(int(eos))
    return before, after


def tokenize_causal(tokenizer: Any, data: Any, max_length: int) -> CausalTokenized:
    """Tokenise :class:`gradkit.data.causal.CausalLMData` once: ``before + prompt + response + after``
    (:func:`framing`; prompt and response tokenised separately, so no token spans their boundary),
    labels ``IGNORE_INDEX`` on ``before + prompt`` and on position 0, the token ids elsewhere. Longer
    sequences keep their first ``max_length`` tokens (the prompt's start; a cut response loses its
    end and its end-of-text token). An example left with no labelled token is refused."""
    before, after = framing(tokenizer)
    prompts = tokenizer(list(data.prompts), add_special_tokens=False)["input_ids"]
    responses = tokenizer(list(data.responses), add_special_tokens=False)["input_ids"]
    features, labels = [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        context = before + list(prompt)
        target = list(response) + after
        ids = (context + target)[:max_length]
        row = ([IGNORE_INDEX] * len(context) + target)[:max_length]
        row[0] = IGNORE_INDEX  # nothing predicts the first token
        if all(t == IGNORE_INDEX for t in row):
            what = "prompt" if data.prompts[i] else "text"
            raise GradkitError(
                f"{data.where(i)}: no token left to train on: the {what} takes {len(context)} of the "
                f"--max-length {max_length} tokens; raise --max-length or shorten the {what}"
            )
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        labels.append(row)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise GradkitError(
            "the tokenizer has no padding and no end-of-text token to pad with; add a pad_token to its "
            "tokenizer_config.json"
        )
    return CausalTokenized(features, labels, int(pad), "right")
