"""The harness side of ``--task causal-lm``: prompt/response pairs tokenised once with response-only
labels, batches padded on the right with ignored labels, any local ``AutoModelForCausalLM`` folder, and
held-out loss and perplexity.

Labels follow Hugging Face's causal-LM convention: ``labels`` has the shape of ``input_ids``, the model
shifts them (position t's logits predict the token at t + 1) and ignores ``-100``. Prompt positions,
padding and position 0 (which nothing predicts) get ``-100``, so the loss of a batch is

    L = (1 / T) * sum over response positions t of -log p(x_t | x_<t),    T = number of such positions,

the mean cross-entropy over the batch's response tokens (every token of plain texts). A batch cut into
parts (:func:`gradkit.train.batching.split_batch`) weighs each part by its share ``T_c / T`` of those
tokens, so ``sum_c (T_c / T) L_c = L`` exactly, and so is the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradkit.errors import GradkitError
from gradkit.train.batching import Tokenized, pad_features

IGNORE_INDEX = -100  # label of positions without a loss (Hugging Face's and torch's ignore_index)


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


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum of -log p(label), count)`` over the shifted labelled positions, the sum in fp32 from
    fp32 logits: position t's logits score the label at t + 1."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, int((shift_labels != IGNORE_INDEX).sum())


def perplexity(loss: float) -> float:
    """``exp(loss)``, the perplexity of a mean per-token cross-entropy (inf past float range)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate_causal(
    model, data: CausalTokenized, batch_size: int = 128, device: Any = "cpu", prefix: str = "test"
) -> dict[str, float]:
    """Held-out ``<prefix>_loss``, the mean cross-entropy per labelled token over the whole set
    (``sum_t -log p(x_t | x_<t) / T``, not a mean of batch means), ``<prefix>_perplexity`` =
    exp(loss), and ``<prefix>_tokens`` = T. Eval mode; batches in length order."""
    was_training = model.training
    model.eval()
    lengths = data.lengths()
    order = sorted(range(len(data)), key=lambda i: -lengths[i])
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in data.collate(order[start : start + batch_size]).items()}
        labels = batch.pop("labels")
        nll, n = token_nll(model(**batch).logits, labels)
        total += float(nll.double())
        count += n
    model.train(was_training)
    loss = total / count
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": perplexity(loss), f"{prefix}_tokens": count}


def load_causal_lm(path: str | None):
    """A local ``AutoModelForCausalLM`` folder (Llama-, Qwen-, GPT-2-style), in fp32 whatever dtype it
    was saved in (the master weights; ``--precision bf16`` autocasts the computation). Draws leave the
    global RNG as it was."""
    from transformers import AutoModelForCausalLM

    from gradkit.train.model import _check_model_dir, quiet_transformers

    if path is None:
        raise GradkitError(
            "--task causal-lm needs --model PATH, a local causal language model folder (Llama, Qwen, "
            "GPT-2...); the bundled MiniLM is an encoder"
        )
    _check_model_dir(path)
    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except ValueError as err:
            raise GradkitError(
                f"{path} is not a causal language model AutoModelForCausalLM can load "
                f"({str(err).splitlines()[0][:160]}); pass a decoder folder (Llama, Qwen, GPT-2...)"
            ) from None
        except OSError as err:
            raise GradkitError(f"cannot load a model from {path}: {str(err).splitlines()[0]}") from None
    if not is_causal(model):
        raise GradkitError(
            f"{path} is not a causal language model: its outputs at a position depend on later tokens "
            f"({type(model).__name__} attends both ways); pass a decoder folder (Llama, Qwen, GPT-2...)"
        )
    return model


@torch.no_grad()
def is_causal(model) -> bool:
    """True when the logits at positions 0..2 do not change with the token at position 3 (eval mode): a
    decoder. An encoder loaded as a language model (BERT's ``BertLMHeadModel`` without ``is_decoder``)
    sees the token it is asked to predict, and its loss would mean nothing."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 1]], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[:, :3].float()
    model.train(was_training)
    return bool(torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5))
