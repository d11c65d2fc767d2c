"""``lora-rite``: PEFT LoRA trained by LoRA-RITE (Yen et al., "LoRA Done RITE: Robust Invariant
Transformation Equilibration for LoRA Optimization", ICLR 2025, arXiv 2410.20625), the peer of
``lora-pro``: both change how the factors move, not where they start.

LoRA-RITE preconditions each factor in the r×r basis of the other, so the update of ``ΔW = B A`` does
not depend on how the product is split between the factors (``B A = (B S)(S⁻¹ A)`` gives the same
step), which plain Adam on the factors lacks. The optimiser is pytorch-optimizer's ``LoRARite`` (an
optional extra: ``pip install 'gradkit[peers]'``) with its defaults: its own clipping of the unmagnified
gradient at 1, weight decay ``--weight-decay``. It takes the factors in pairs, each adapted layer's
``lora_A`` then its ``lora_B`` (:func:`gradkit.lora.pairs.lora_pairs`); the head (and anything else
trainable) trains with AdamW beside it (:func:`gradkit.train.optimizers.beside_adamw`).
"""

from __future__ import annotations

from gradkit.lora.pairs import lora_pairs
from gradkit.train.methods.base import register_method
from gradkit.train.methods.lora import Lora
from gradkit.train.optimizers import beside_adamw


@register_method
class LoraRite(Lora):
    """PEFT LoRA with pytorch-optimizer's ``LoRARite`` on the factors and AdamW on the head."""

    name = "lora-rite"

    def make_optimizer(self, model, cfg, lr):
        from pytorch_optimizer import LoRARite  # an optional extra, checked with the settings

        factors = [factor for pair in lora_pairs(model) for factor in (pair.A, pair.B)]
        return beside_adamw(LoRARite(factors, lr=lr, weight_decay=cfg.weight_decay), model, cfg, lr)
