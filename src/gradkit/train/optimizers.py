"""The optimiser of a backprop method, ``--optimizer``:

- ``adamw``: AdamW over every trainable tensor, no weight decay on biases and norms.
- ``muon``: ``torch.optim.Muon`` (Jordan et al. 2024: momentum, then an approximately orthogonalised
  update by Newton–Schulz) on the *matrices*, AdamW on the rest.
- ``steepest-spectral``: :class:`gradkit.SteepestDescent` with ``norm="spectral"`` on the matrices (the
  exact orthogonalised step ``U Vᵀ`` that Muon approximates, with Muon's Nesterov momentum 0.95), AdamW on
  the rest.
- ``schedule-free``: Schedule-Free AdamW (Defazio et al. 2024, arXiv 2405.15682; the ``schedulefree``
  package) over every trainable tensor: its own warm-up over ``--warmup-ratio`` of the steps and no decay,
  trained at its interpolated point ``y`` and evaluated, tested and saved at its average ``x``.

The matrices are the 2-D trainable tensors of the encoder: the LoRA factors under ``lora``, the Linear
weights under ``full``. The embeddings (looked up row by row, which the spectral norm does not describe)
and the head (its rows are the labels) stay with AdamW, as in Muon's own recipes.

One ``--lr`` for both parts: the matrix step is scaled by Moonlight's ``0.2·√max(m, n)`` (Liu et al.
2025, "Muon is Scalable for LLM Training", arXiv 2502.16982), which gives an orthogonal update the RMS of
a typical AdamW update, so AdamW's learning rate carries over (``adjust_lr_fn="match_rms_adamw"`` in
torch's Muon; the same factor on each spectral group's lr, its weight decay divided by it so that the
decay per step stays ``lr·λ`` as in Muon).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradkit.optim.combined import CombinedOptimizer
from gradkit.optim.steepest import SteepestDescent
from gradkit.train.config import TrainConfig

MUON_MOMENTUM = 0.95  # torch.optim.Muon's default, used for the spectral steps as well
RMS_MATCH = 0.2  # Moonlight's factor: 0.2·√max(m, n)


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` with its fused kernel where torch has one for these tensors (CPU since torch
    2.4, CUDA): one pass over each tensor instead of several multi-tensor kernels, which on a CPU is
    most of a full fine-tuning step's optimiser time. Otherwise the multi-tensor path."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device, dtype or torch
        return torch.optim.AdamW(groups, lr=lr)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and normalisation weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def is_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D tensor of the encoder: not an embedding table, not the head."""
    return param.ndim == 2 and "embeddings" not in name and "head" not in name.split(".")


def rms_match(shape: torch.Size) -> float:
    """Moonlight's ``0.2·√max(m, n)``: an orthogonal ``m×n`` update (RMS ``1/√max(m, n)``) scaled to
    AdamW's typical update RMS of 0.2."""
    return RMS_MATCH * math.sqrt(max(shape))


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``model``'s trainable tensors at ``lr`` (see the module docstring)."""
    if cfg.optimizer == "adamw":
        return adamw(decay_groups(model, cfg.weight_decay), lr)
    if cfg.optimizer == "schedule-free":
        import schedulefree  # an optional extra: checked with the settings

        warmup = math.ceil(cfg.warmup_ratio * cfg.steps)
        return schedulefree.AdamWScheduleFree(
            decay_groups(model, cfg.weight_decay), lr=lr, warmup_steps=warmup
        )
    matrices = [p for name, p in model.named_parameters() if p.requires_grad and is_matrix(name, p)]
    if cfg.optimizer == "muon":
        first: torch.optim.Optimizer = torch.optim.Muon(
            matrices,
            lr=lr,
            weight_decay=cfg.weight_decay,
            momentum=MUON_MOMENTUM,
            nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
    else:  # steepest-spectral: one group per lr factor, where same-shaped matrices step as one batch
        by_factor: dict[float, list[nn.Parameter]] = {}
        for p in matrices:
            by_factor.setdefault(rms_match(p.shape), []).append(p)
        groups = [
            {"params": params, "lr": lr * factor, "weight_decay": cfg.weight_decay / factor}
            for factor, params in by_factor.items()
        ]
        first = SteepestDescent(groups, lr=lr, norm="spectral", momentum=MUON_MOMENTUM, nesterov=True)
    return beside_adamw(first, model, cfg, lr)


def beside_adamw(
    first: torch.optim.Optimizer, model: nn.Module, cfg: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    """``first`` with AdamW (:func:`decay_groups`) on every trainable tensor it does not hold, as one
    :class:`~gradkit.optim.combined.CombinedOptimizer`; ``first`` alone when it holds them all."""
    chosen = {id(p) for group in first.param_groups for p in group["params"]}
    rest = [
        {**group, "params": [p for p in group["params"] if id(p) not in chosen]}
        for group in decay_groups(model, cfg.weight_decay)
    ]
    rest = [group for group in rest if group["params"]]
    return CombinedOptimizer([first, adamw(rest, lr)]) if rest else first


def optimizer_split(optimizer: Any) -> list[dict[str, Any]]:
    """Which optimiser trains how many tensors and parameters (``summary["optimizer_split"]``)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    parts = inner.optimizers if isinstance(inner, CombinedOptimizer) else [inner]
    return [
        {
            "optimizer": type(part).__name__,
            "tensors": sum(len(g["params"]) for g in part.param_groups),
            "parameters": sum(p.numel() for g in part.param_groups for p in g["params"]),
        }
        for part in parts
    ]


def _switch(optimizer: Any, mode: str) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if callable(getattr(inner, mode, None)):
        getattr(inner, mode)()


def training_weights(optimizer: Any) -> None:
    """Put the weights where the optimiser trains them (Schedule-Free: ``y``); other optimisers have
    one set of weights and nothing changes."""
    _switch(optimizer, "train")


def evaluation_weights(optimizer: Any) -> None:
    """Put the weights where the optimiser evaluates them (Schedule-Free: its average ``x``)."""
    _switch(optimizer, "eval")


@contextlib.contextmanager
def evaluating(optimizer: Any) -> Iterator[None]:
    """The evaluation weights for the block (a dev evaluation, a checkpoint), then the training ones."""
    evaluation_weights(optimizer)
    try:
        yield
    finally:
        training_weights(optimizer)
