"""``lora-rite``: PEFT LoRA trained by LoRA-RITE (Yen et al., "LoRA Done RITE: Robust Invariant
Transformation Equilibration for LoRA Optimization", ICLR 2025, arXiv 2410.20625), the peer of
``lora-pro``: both change how the factors move, not where they start.

LoRA-RITE preconditions each factor in the r×r basis of the other, so the update of ``ΔW = B A`` does
not depend on how the product is split between the factors (``B A = (B S)(S⁻¹ A)`` gives the same
step), which plain Adam on the factors lacks. The optimiser is pytorch-optimizer's ``LoRARite`` (an
optional extra: ``pip install 'gradkit[peers]'``) with its defaults: its own clipping of the unmagnified
gradient at 1, weight decay ``--weight-decay``. It takes the factors in pairs, each adapted layer's
``lora_A`` then its ``lora_B``; the head (and anything else trainable) trains with AdamW beside it
(:class:`gradkit.optim.combined.CombinedOptimizer`).
"""

from __future__ import annotations

from peft.tuners.lora import LoraLayer

from gradkit.optim.combined import CombinedOptimizer
from gradkit.train.methods.base import register_method
from gradkit.train.methods.lora import Lora
from gradkit.train.optimizers import adamw, decay_groups


def factor_pairs(model) -> list:
    """Every adapted layer's ``lora_A`` and ``lora_B`` weights, in that order, layer after layer."""
    pairs = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                pairs += [module.lora_A[adapter].weight, module.lora_B[adapter].weight]
    return pairs


@register_method
class LoraRite(Lora):
    """PEFT LoRA with pytorch-optimizer's ``LoRARite`` on the factors and AdamW on the head."""

    name = "lora-rite"

    def make_optimizer(self, model, cfg, lr):
        from pytorch_optimizer import LoRARite  # an optional extra, checked with the settings

        pairs = factor_pairs(model)
        chosen = {id(p) for p in pairs}
        rest = [
            {**group, "params": [p for p in group["params"] if id(p) not in chosen]}
            for group in decay_groups(model, cfg.weight_decay)
        ]
        rite = LoRARite(pairs, lr=lr, weight_decay=cfg.weight_decay)
        rest = [group for group in rest if group["params"]]
        return CombinedOptimizer([rite, adamw(rest, lr)]) if rest else rite
