"""Small helpers shared by test files (importable because pytest puts tests/ on sys.path with conftest)."""

from __future__ import annotations

from torch import nn


def peft_lora(model: nn.Module, r: int = 4, alpha: float = 8.0, adapter: str = "default", **kwargs):
    """PEFT LoRA on every encoder Linear of a gradkit classifier, no dropout, the head trained fully."""
    from peft import LoraConfig, get_peft_model

    from gradkit.train.model import lora_target_names

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=lora_target_names(model),
        modules_to_save=["head"],
        **kwargs,
    )
    return get_peft_model(model, cfg, adapter_name=adapter)
