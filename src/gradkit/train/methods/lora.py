"""``lora``: PEFT LoRA on the encoder's Linear layers, the head trained fully (PEFT ``modules_to_save``);
the base of every LoRA-shaped method (LoRA-GA, LoRA-Pro, LoRA+, MeZO on LoRA)."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, get_peft_model
from torch import nn

from gradkit.files import atomic_dir
from gradkit.lora.export import stable_config
from gradkit.train.config import TrainConfig
from gradkit.train.methods.base import Method, register_method
from gradkit.train.model import adaptable_layers, lora_target_names, quiet_transformers
from gradkit.train.validate import check_lora_rank


@register_method
class Lora(Method):
    """PEFT LoRA on the encoder's Linear layers; the head trains fully (PEFT ``modules_to_save``)."""

    name = "lora"
    default_lr = 1e-3

    def lora_config(self, model: nn.Module, cfg: TrainConfig, **overrides: Any) -> LoraConfig:
        """PEFT's LoraConfig from the run's LoRA settings (rank, alpha, dropout, targets, rsLoRA), the
        rank checked against the targeted layers; ``overrides`` replace any of its arguments."""
        targets = lora_target_names(model, cfg.targets)
        check_lora_rank(cfg, model, targets)
        kwargs = dict(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            use_rslora=cfg.rslora,
            modules_to_save=["head"],
        )
        if cfg.task == "causal-lm":
            # no head to save; PEFT's causal-LM wrapper (generate, and the task type in adapter_config.json);
            # GPT-2's Conv1D layers store W transposed, which PEFT adapts with fan_in_fan_out
            conv = [
                type(m).__name__ == "Conv1D"
                for n, m in adaptable_layers(model)
                if n.rsplit(".", 1)[-1] in targets
            ]
            kwargs.update(
                modules_to_save=None, task_type="CAUSAL_LM", fan_in_fan_out=bool(conv) and all(conv)
            )
        kwargs.update(overrides)
        return LoraConfig(**kwargs)

    def prepare(self, model, cfg, batches):
        return get_peft_model(model, self.lora_config(model, cfg))

    def save(self, model, out_dir):
        with quiet_transformers(), atomic_dir(out_dir / "adapter") as tmp, stable_config(model):
            model.save_pretrained(str(tmp))
