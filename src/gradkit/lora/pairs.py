"""Find every LoRA factor pair (A, B) and its scale s in a PEFT model.

A PEFT LoRA Linear layer computes ``W0 x + s * B (A x)`` with ``A = lora_A[adapter].weight``
(r x in), ``B = lora_B[adapter].weight`` (out x r) and ``s = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA). PEFT stores s per layer and per adapter in ``layer.scaling``, already resolved from
rank/alpha patterns and the rsLoRA switch, so reading it there is exact for every configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradkit.errors import GradkitError


@dataclass(frozen=True)
class LoraPair:
    """One LoRA Linear layer's factors for one adapter."""

    name: str
    layer: nn.Module
    adapter: str
    A: nn.Parameter  # r x in
    B: nn.Parameter  # out x r
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight W0, always returned as (out x in)."""
        weight = self.layer.get_base_layer().weight
        return weight.T if getattr(self.layer, "fan_in_fan_out", False) else weight


def _active_adapter(model: nn.Module) -> str:
    adapter = getattr(model, "active_adapter", None)
    if isinstance(adapter, (list, tuple)):
        if len(adapter) != 1:
            raise GradkitError(
                f"the model has {len(adapter)} active adapters {list(adapter)}; "
                "activate one with model.set_adapter(name) or pass adapter=name"
            )
        adapter = adapter[0]
    return adapter or "default"


def lora_pairs(model: nn.Module, adapter: str | None = None) -> list[LoraPair]:
    """Return the (A, B, s) triple of every LoRA Linear layer of ``model`` for ``adapter``.

    ``adapter`` defaults to the model's active adapter. Raises :class:`GradkitError` when the model
    has no PEFT LoRA Linear layer for that adapter.
    """
    from peft.tuners.lora import Linear as LoraLinear

    adapter = adapter or _active_adapter(model)
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter in module.lora_A:
            pairs.append(
                LoraPair(
                    name=name,
                    layer=module,
                    adapter=adapter,
                    A=module.lora_A[adapter].weight,
                    B=module.lora_B[adapter].weight,
                    scaling=float(module.scaling[adapter]),
                )
            )
    if not pairs:
        raise GradkitError(
            f"no PEFT LoRA Linear layer for adapter {adapter!r} in {type(model).__name__}; "
            "wrap the model with peft.get_peft_model(model, LoraConfig(target_modules=...)) first"
        )
    return pairs
