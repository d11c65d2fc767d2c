"""``head`` (a linear probe: only the classification head trains) and ``full`` (every weight trains):
the two methods that train the model's own weights with the base class's AdamW step."""

from __future__ import annotations

from gradkit.train.methods.base import Method, register_method


@register_method
class Head(Method):
    """Linear probe: the encoder is frozen, only the classification head trains."""

    name = "head"
    default_lr = 2e-3

    def prepare(self, model, cfg, batches):
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("head."))
        return model


@register_method
class Full(Method):
    """Full fine-tuning: every weight trains with AdamW."""

    name = "full"
    default_lr = 5e-5

    def prepare(self, model, cfg, batches):
        model.requires_grad_(True)
        return model
