"""Head warm-up (LP-FT: Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", arXiv 2202.10054): train the head alone on the frozen encoder's
features for a few steps, then let the method fine-tune from a head that already fits the task.

A randomly initialised head sends large, meaningless gradients into the encoder at the start of
fine-tuning; after a linear probe the early gradients say what the task needs (which is also what
LoRA-GA's step-0 gradient is meant to capture). The warm-up runs in eval mode (no dropout: it draws
no random numbers) with the encoder under ``no_grad``, so each step costs one inference forward of
the encoder plus the head's backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gradkit.train.batching import split_batch
from gradkit.train.optimizers import adamw


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over the processes of the default group (no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)
            t.div_(dist.get_world_size())


def warm_up_head(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    max_examples: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``model.head`` alone with AdamW (constant ``lr``) for one step per batch of ``batches``
    (each this process's share; gradients are averaged over processes), leaving every other weight
    and every ``requires_grad`` flag as it found them. ``model`` is a
    :class:`~gradkit.train.model.SequenceClassifier` (it has ``pool``, ``head`` and ``loss_of``).

    Each batch is cut into length-sorted parts as training does (the same mean gradient). Returns
    ``{"steps", "lr", "losses", "seconds"}``; ``on_step(step, loss)`` sees every step's batch loss.
    """
    head_params = list(model.head.parameters())
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head_params:
        p.requires_grad_(True)
    decay = [p for p in head_params if p.ndim >= 2]
    no_decay = [p for p in head_params if p.ndim < 2]
    optimizer = adamw(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr
    )
    losses: list[float] = []
    start = time.perf_counter()
    model.eval()
    try:
        for step, batch in enumerate(batches, 1):
            total = torch.zeros((), dtype=torch.float64)
            for part, weight in split_batch(batch, max_examples=max_examples):
                labels = part.pop("labels")
                with torch.no_grad():
                    pooled = model.pool(**part)
                loss = model.loss_of(model.head(pooled), labels)
                (loss * weight).backward()
                total += loss.detach().double().cpu() * weight
            grads = [p.grad for p in head_params if p.grad is not None]
            _all_reduce_mean(grads + [total])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total.item())
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {"steps": len(losses), "lr": lr, "losses": losses, "seconds": time.perf_counter() - start}
