"""``peft-lora-ga``: PEFT's own LoRA-GA (``preprocess_loraga`` + ``init_lora_weights="lora_ga"``), run
through the same harness as gradkit's ``lora-ga`` so the two can be compared on equal terms.

PEFT's version differs from the paper's (and gradkit's) in two ways that change the first step: it
folds the singular values of the kept directions into B, and its "stable" scale multiplies B only.
It estimates the gradient in train mode (dropout on) and takes ``torch.svd_lowrank`` from the global
RNG (forked here, so the run's data order is unchanged). The adapter is saved with
:func:`gradkit.save_adapter`, so it loads onto the original base like every other run's.
"""

from __future__ import annotations

import itertools

import torch
from peft import LoraConfig, get_peft_model

from gradkit.lora.export import save_adapter
from gradkit.train.method_options import PeftLoraGAOptions
from gradkit.train.methods.base import register_method
from gradkit.train.methods.lora import Lora
from gradkit.train.methods.peft_inits import record_initial_factors
from gradkit.train.settings import settings_from


@register_method
class PeftLoraGA(Lora):
    """PEFT LoRA with PEFT's LoRA-GA initialisation (for comparison with gradkit's ``lora-ga``)."""

    name = "peft-lora-ga"
    default_lr = 5e-4

    def prepare(self, model, cfg, batches):
        # PEFT's LoRA-GA is newer than the PEFT gradkit needs: only this method requires it
        from peft.tuners.lora import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config = self.lora_config(model, cfg, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
        assert isinstance(config, LoraConfig)
        count = settings_from(PeftLoraGAOptions, cfg.options).peft_ga_batches
        head = list(itertools.islice(batches, count))

        def train_step() -> None:
            for batch in head:
                model(**batch).loss.backward()

        # svd_lowrank inside PEFT draws from the global RNG: fork it so the runs' data order is unchanged
        with torch.random.fork_rng(devices=[]):
            preprocess_loraga(model, config, train_step)
            peft_model = get_peft_model(model, config)
        # record PEFT's (A0, B0) as gradkit's lora_ga_init does, so gradkit.save_adapter writes the adapter for
        # the original base (PEFT's own conversion, path_initial_model_for_weight_conversion, fails when the
        # model has modules_to_save such as the classification head)
        record_initial_factors(peft_model)
        return peft_model

    def save(self, model, out_dir):
        save_adapter(model, out_dir / "adapter")
