"""Evaluation of a model on held-out data, in eval mode (no dropout) and in length-sorted batches (each
padded little; the metrics do not depend on the batching): the task's metrics and loss for
classification and regression, the loss per token and perplexity for a causal LM."""

from __future__ import annotations

from typing import Any

import torch

from gradkit.train.causal import perplexity, token_nll
from gradkit.train.metrics import task_metrics
from gradkit.train.tokenize import CausalTokenized, Tokenized, tokenize_data


@torch.no_grad()
def evaluate(
    model, data: Tokenized, batch_size: int = 128, device: Any = "cpu", prefix: str = "test"
) -> dict[str, float]:
    """``<prefix>_loss`` and every metric of the task (:func:`gradkit.train.metrics.task_metrics`:
    accuracy, macro-F1 and Matthews correlation of the argmax; Pearson and Spearman of the output for
    regression, whose data carry float labels) of ``model`` on ``data`` (eval mode, no dropout).
    Batches are formed in length order, so each is padded little; the metrics do not depend on the
    batching. Causal-LM data: :func:`evaluate_causal` (loss per token, perplexity)."""
    if isinstance(data, CausalTokenized):
        return evaluate_causal(model, data, batch_size, device, prefix)

    was_training = model.training
    model.eval()
    lengths = data.lengths()
    order = sorted(range(len(data)), key=lambda i: -lengths[i])  # longest first: peak memory up front
    outputs: torch.Tensor | None = None
    loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in data.collate(rows).items()}
        out = model(**batch)
        loss_sum += out.loss.double().item() * len(rows)
        logits = out.logits.detach().float().cpu()
        if outputs is None:
            outputs = torch.empty(len(data), *logits.shape[1:])
        outputs[torch.tensor(rows)] = logits
    model.train(was_training)
    task = "regression" if data.label_dtype.is_floating_point else "classification"
    labels = torch.tensor(data.labels, dtype=data.label_dtype)
    assert outputs is not None
    return {**task_metrics(task, outputs, labels, prefix), f"{prefix}_loss": loss_sum / len(data)}


def evaluate_texts(
    model, data, tokenizer, max_length: int, batch_size: int = 128, device="cpu", prefix: str = "test"
) -> dict[str, float]:
    """:func:`evaluate` on a loaded data set (tokenised here, pairs included, as the harness does: each
    text of a pair on its own for a bi-encoder pair model, which says so by its ``pair_encoding``)."""
    tokens = tokenize_data(tokenizer, data, max_length, getattr(model, "pair_encoding", "cross"))
    return evaluate(model, tokens, batch_size, torch.device(device), prefix)


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
