"""Optimisers: LoRA-Pro and zeroth order with their small dense kernels; steepest descent under a norm
and error-controlled gradient descent; several optimisers stepped as one (imported on first use, so ``import gradkit.optim`` stays light)."""

from __future__ import annotations

from gradkit.lazy import lazy_exports

_EXPORTS = {
    "CombinedOptimizer": "gradkit.optim.combined",
    "SteepestDescent": "gradkit.optim.steepest",
    "ErrorControlledGD": "gradkit.optim.error_control",
    "LoRAPro": "gradkit.optim.lora_pro",
    "ZerothOrder": "gradkit.optim.zeroth_order",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
