"""Harness methods around LoRA's optimiser: ``lora-pro`` (gradkit's LoRA-Pro, arXiv 2407.18242),
``lora-plus`` (PEFT's LoRA+, arXiv 2402.12354) and ``lora-ga-pro`` (LoRA-GA's initialisation, then
LoRA-Pro: both factors non-zero from the first step, the pairing LoRA-Pro's authors recommend).

Each is PEFT LoRA on the same target layers as ``lora``; only the optimiser differs (and, for
``lora-ga-pro``, the initialisation), so ``gradkit compare`` isolates that difference.
"""

from __future__ import annotations

import torch
from peft.optimizers import create_loraplus_optimizer
from torch import nn

from gradkit.optim.lora_pro import LoRAPro
from gradkit.train.config import TrainConfig
from gradkit.train.method_options import LoraPlusOptions, LoraProOptions
from gradkit.train.methods.base import register_method
from gradkit.train.methods.lora import Lora
from gradkit.train.methods.lora_ga import LoraGA
from gradkit.train.settings import settings_from


def lora_pro_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """:class:`gradkit.LoRAPro` with the run's weight decay and the ``--pro-*`` options."""
    options = settings_from(LoraProOptions, cfg.options)
    return LoRAPro(
        model,
        lr=lr,
        weight_decay=cfg.weight_decay,
        optimizer=options.pro_optimizer,
        moments=options.pro_moments,
        x_solution=options.pro_x,
    )


@register_method
class LoraPro(Lora):
    """PEFT LoRA trained with LoRA-Pro: every step's update of W is the closest LoRA can make to
    full fine-tuning's (``P_B G + (I - P_B) G P_A``), with Adam moments per ``--pro-moments``."""

    name = "lora-pro"
    # best of 4e-4..3.2e-3 on MiniLM + SST-2 (benchmarks/lora_quality.py, 100 steps, seed 0; flat from
    # 8e-4 to 3.2e-3) with the exact projections and factorisation-independent bases: 4x full FT's best
    # (2e-4), since the projection keeps only part of the Adam-normalised full-size step; lora-ga-pro's
    # best was 8e-4 too
    default_lr = 8e-4

    def make_optimizer(self, model, cfg, lr):
        return lora_pro_optimizer(model, cfg, lr)


@register_method
class LoraPlus(Lora):
    """PEFT LoRA trained with LoRA+ (PEFT's ``create_loraplus_optimizer`` over AdamW): B's learning
    rate is ``--loraplus-ratio`` times A's."""

    name = "lora-plus"
    default_lr = 5e-4  # PEFT's advice: a little below LoRA's (1e-3), B then runs at ratio x lr

    def make_optimizer(self, model, cfg, lr):
        ratio = settings_from(LoraPlusOptions, cfg.options).loraplus_ratio
        return create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, weight_decay=cfg.weight_decay
        )


@register_method
class LoraGaPro(LoraGA):
    """The ``lora-ga`` method (its initialisation, checkpoint and save) with LoRA-Pro's optimiser."""

    name = "lora-ga-pro"
    default_lr = LoraPro.default_lr

    def make_optimizer(self, model, cfg, lr):
        return lora_pro_optimizer(model, cfg, lr)
