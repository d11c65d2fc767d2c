"""Batches without wasted padding: texts tokenised once, padded per batch, and each training batch cut
into length-sorted micro-batches whose gradients add up to the whole batch's.

A batch padded to its longest example spends most of its compute on padding when lengths vary: on
the bundled SST-2 sample a batch of 32 holds 2.98 times more token positions than real tokens. The
loss of a batch is the mean of per-example losses, so its gradient is the weighted sum of the mean
gradients of any partition of it, ``g = sum_c (n_c / N) g_c``. :func:`split_batch` chooses the
partition: sort the examples by length and cut the sorted list where the padded cost
``sum_c (n_c * L_c + overhead)`` is least (an exact dynamic programme over the cut points), with at
most ``max_examples`` examples per part when memory bounds it (``--grad-accum``). Attention masks
make every example's output independent of its batch mates, so the parts give the whole batch's
loss and gradient up to float rounding; the examples, their order in the data stream and the step's
batch are unchanged.

That holds with padding on the right only. Models such as GPT-2 and Llama number positions from each
row's start, padding included, so a row padded on the left puts its tokens at shifted positions, and
a whole left-padded batch has another loss than its trimmed parts (the parts' being the unpadded
one). So gradkit's batches are padded on the right whatever the tokenizer's ``padding_side``
(:meth:`gradkit.train.tokenize.Tokenized.collate`), and :func:`split_batch` moves the tokens of a
batch padded on the left to the start of their rows, so every part, the single part of an unsplit
batch included, is position-correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradkit.train.tokenize import IGNORE_INDEX, PAIR_PER_TOKEN, PAIR_PREFIX, PER_TOKEN

# one more forward/backward pass costs about as much as this many padded token positions (a part's
# fixed cost: Python, kernel launches, small-matrix inefficiency); benchmarks/compare_time.py measures
# the parts against one padded pass per batch
PART_OVERHEAD_TOKENS = 128


def _cuts(sorted_lengths: Sequence[int], max_examples: int, overhead: int) -> list[int]:
    """End positions of the parts of a length-sorted list minimising ``sum (n * longest + overhead)``."""
    n = len(sorted_lengths)
    best = [0.0] + [float("inf")] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sorted_lengths[j - 1]
        for i in range(max(0, j - max_examples), j):
            cost = best[i] + (j - i) * longest + overhead
            if cost < best[j]:
                best[j], start[j] = cost, i
    ends, j = [], n
    while j > 0:
        ends.append(j)
        j = start[j]
    return ends[::-1]


def split_batch(
    batch: dict[str, torch.Tensor],
    *,
    max_examples: int | None = None,
    trim: bool = True,
    overhead: int = PART_OVERHEAD_TOKENS,
) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Cut ``batch`` into parts ``[(part, n_part / N), ...]`` covering every example once, each part
    padded only to its own longest example.

    ``trim``: sort by length and choose the cuts that waste least padding. Otherwise consecutive
    parts of ``max_examples`` in the batch's order (gradient accumulation as usually written).
    ``max_examples`` bounds every part (memory); None: no bound. The weights add up to 1:
    ``sum_c w_c * mean_loss(part_c)`` is the batch's mean loss.

    A batch padded on the left (a row whose mask starts with 0) has its per-token tensors moved to the
    start of each row first: every part is padded on the right (see the module docstring).

    Per-token labels (a causal LM's ``labels`` of shape ``(N, length)``, shifted inside the model,
    ``-100`` where there is no loss) make the loss a mean over labelled tokens, not examples: then
    ``w_c = T_c / T``, part c's share of the labelled positions ``labels[:, 1:] != -100``, so that
    ``sum_c (T_c / T) * (S_c / T_c) = S / T`` is again the batch's loss.
    """
    n = len(batch["labels"])
    limit = n if max_examples is None else max(1, min(int(max_examples), n))
    counts = _label_tokens(batch["labels"])
    total = float(counts.sum()) if counts is not None else 0.0

    def weight(rows: Any, size: int) -> float:
        return float(counts[rows].sum()) / total if total > 0 else size / n

    mask = batch.get("attention_mask")
    if mask is None:  # nothing says where padding is: consecutive parts as they come
        bounds = [(i, min(i + limit, n)) for i in range(0, n, limit)]
        return [({k: v[a:b] for k, v in batch.items()}, weight(slice(a, b), b - a)) for a, b in bounds]
    groups = _token_groups(batch)
    for prefix, keys in groups.items():
        group_mask = batch[prefix + "attention_mask"]
        if bool((group_mask[:, 0] == 0).any()):
            batch = _pad_right(batch, keys, group_mask)
    lengths = sum(batch[prefix + "attention_mask"].sum(1) for prefix in groups)
    if trim:
        order = torch.sort(lengths, stable=True).indices
        ends = _cuts(lengths[order].tolist(), limit, overhead)
    else:
        order = torch.arange(n)
        ends = list(range(limit, n, limit)) + [n]
    parts, begin = [], 0
    for end in ends:
        rows = order[begin:end]
        part = {key: value[rows] for key, value in batch.items()}
        for prefix, keys in groups.items():  # each text of a pair to its own longest in the part
            longest = int(part[prefix + "attention_mask"].sum(1).max())
            for key in keys:
                if part[key].ndim == 2:
                    part[key] = part[key][:, :longest]
        parts.append((part, weight(rows, end - begin)))
        begin = end
    return parts


def _token_groups(batch: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The per-token keys of ``batch`` by the text they belong to: ``""`` (the text, and a causal LM's
    per-token ``labels``) and, in a bi-encoder batch, ``PAIR_PREFIX`` (the pairs' second texts)."""
    groups = {"": [k for k in batch if k in PER_TOKEN or (k == "labels" and batch[k].ndim == 2)]}
    if PAIR_PREFIX + "attention_mask" in batch:
        groups[PAIR_PREFIX] = [k for k in batch if k in PAIR_PER_TOKEN]
    return groups


def _pad_right(
    batch: dict[str, torch.Tensor], keys: list[str], mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The batch with each row's values under ``keys`` rotated left by its leading pad positions
    (``mask``'s zeros before the first token): the tokens at the start of the row (at positions 0,
    1, …), the padding after them."""
    width = mask.shape[1]
    pads = width - mask.sum(1)
    index = (torch.arange(width, device=mask.device) + pads[:, None]) % width
    out = dict(batch)
    for key in keys:
        if batch[key].ndim == 2 and batch[key].shape[1] == width:
            out[key] = batch[key].gather(1, index.to(batch[key].device))
    return out


def _label_tokens(labels: torch.Tensor) -> torch.Tensor | None:
    """Labelled positions of each row of per-token (causal, shifted) labels; None for one label a row."""
    if labels.ndim != 2:
        return None
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


def padded_positions(parts: Sequence[tuple[dict[str, torch.Tensor], float]]) -> int:
    """Token positions the parts compute (padding included): what :func:`split_batch` minimises."""
    return sum(int(p["input_ids"].numel()) for p, _ in parts)


def forward_parts(model: Any, parts: Sequence[tuple[dict[str, torch.Tensor], float]]):
    """Forward every part: the whole batch's mean loss ``sum_c w_c loss_c``, and the logits with
    their labels, row for row (in the parts' order, which batch metrics such as accuracy ignore)."""
    loss = None
    logits, labels = [], []
    for part, weight in parts:
        out = model(**part)
        loss = out.loss * weight if loss is None else loss + out.loss * weight
        logits.append(out.logits)
        labels.append(part["labels"])
    return loss, torch.cat(logits), torch.cat(labels)
