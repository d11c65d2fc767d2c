"""gradkit: cheaper training and fine-tuning without making it worse.

The public API is re-exported here lazily, so ``import gradkit`` stays light (no transformers or
peft import until a name that needs them is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "GradkitError": "gradkit.errors",
    # data and harness
    "load_text_classification": "gradkit.data.text",
    "TrainConfig": "gradkit.train.config",
    "finetune": "gradkit.train.loop",
    "load_classifier": "gradkit.train.model",
    # LoRA
    "lora_pairs": "gradkit.lora.pairs",
    "lora_ga_init": "gradkit.lora.ga",
    "save_adapter": "gradkit.lora.export",
    "LoRAPro": "gradkit.optim.lora_pro",
    # zeroth order and policy gradient
    "ZerothOrder": "gradkit.optim.zeroth_order",
    "zo_gradient": "gradkit.estimators",
    "policy_gradient_loss": "gradkit.estimators",
    # batch size and learning rate
    "NoiseScale": "gradkit.scaling.noise_scale",
    "BatchSchedule": "gradkit.scaling.batch_schedule",
    "branch_cbs": "gradkit.scaling.critical_batch",
    "critical_batch_size": "gradkit.scaling.critical_batch",
    "lr_for_batch": "gradkit.scaling.laws",
    "steps_examples_tradeoff": "gradkit.scaling.laws",
    # averaging, capture, init, diagnostics
    "EMA": "gradkit.ema",
    "capture": "gradkit.capture",
    "tap": "gradkit.capture",
    "truncated_normal_": "gradkit.init",
    "audit_init": "gradkit.audit",
    "gradient_flow": "gradkit.diagnostics",
}

# public subpackages, imported on first attribute access (``gradkit.init.bert_init_`` after ``import gradkit``)
_SUBMODULES = ("audit", "dynamics", "init", "models", "optim", "scaling")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"gradkit.{name}")
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gradkit' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise AttributeError(f"gradkit.{name} is not available in this version of gradkit") from None
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
