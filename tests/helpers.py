"""Small helpers shared by test files (importable because pytest puts tests/ on sys.path with conftest)."""

from __future__ import annotations

import torch
import transformers
from torch import nn


class TokenRows(torch.utils.data.Dataset):
    """``n`` rows of ``length`` random token ids (seeded) for a tiny Trainer run: label 1 everywhere
    (a strong mean gradient, measurable at once) or, with ``random_labels``, random 0/1 labels."""

    def __init__(self, n: int = 32, length: int = 8, random_labels: bool = False):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, 2000, (n, length), generator=g)
        self.labels = (
            torch.randint(0, 2, (n,), generator=g) if random_labels else torch.ones(n, dtype=torch.long)
        )

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


class LogRecorder(transformers.TrainerCallback):
    """Keeps a copy of every dict the Trainer logs (after the callbacks added before it)."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


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
