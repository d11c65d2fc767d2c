"""Optimisers: LoRA-Pro and zeroth order with their small dense kernels; steepest descent under a norm
and error-controlled gradient descent (imported on first use, so ``import gradkit.optim`` stays light)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SteepestDescent": "gradkit.optim.steepest",
    "ErrorControlledGD": "gradkit.optim.error_control",
    "LoRAPro": "gradkit.optim.lora_pro",
    "ZerothOrder": "gradkit.optim.zeroth_order",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gradkit.optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
