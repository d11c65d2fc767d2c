"""PEFT's own LoRA initialisations as harness methods, the peers of gradkit's ``lora-ga``: ``pissa``,
``olora``, ``eva`` and ``corda``, each through PEFT's code path and then trained like ``lora``.

- ``pissa`` (PiSSA: Meng et al. 2024, arXiv 2404.02948): ``A, B`` from the top-``r`` singular triplets of
  ``W`` (``B = U_r S_r^½``, ``A = S_r^½ V_rᵀ``) and the base replaced by the residual ``W - s·B A``.
- ``olora`` (OLoRA: Büyükakyüz 2024, arXiv 2406.01775): ``A, B`` from a QR decomposition of ``W``,
  the base again the residual.
- ``eva`` (EVA: Paischer et al. 2024, arXiv 2410.07170): ``A`` from the right singular vectors of
  the layer's input activations over ``--peft-init-batches`` training batches (incremental PCA), ``B = 0``,
  ranks redistributed across layers by explained variance up to ``rho · r``; the base is unchanged.
- ``corda`` (CorDA: Yang et al. 2024, arXiv 2406.05223): ``W C`` decomposed with ``C`` the covariance of the
  layer's inputs over the same batches (``--corda-method ipm``: adapt the principal components,
  ``kpm``: keep them frozen), the base the residual.

The data passes read the training stream's next batches, as ``lora-ga`` does. Every adapter is saved
with :func:`gradkit.save_adapter` against the *original* base (PEFT's rank-``2r`` conversion where the
base was changed), so it loads with plain PEFT's ``PeftModel.from_pretrained`` onto the model you
started from. A resumed run rebuilds plain LoRA of the same shape (EVA's ranks are part of the method's
own state) and the checkpoint brings the base, the factors and their initial values back.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from gradkit.lora.export import save_adapter
from gradkit.lora.ga import RECORD
from gradkit.lora.pairs import lora_pairs
from gradkit.train.bi_encoder import BiEncoderPairModel
from gradkit.train.config import TrainConfig
from gradkit.train.method_options import PeftInitOptions
from gradkit.train.methods.base import register_method
from gradkit.train.methods.lora import Lora
from gradkit.train.methods.lora_ga import load_with_initial_factors, with_initial_factors
from gradkit.train.settings import settings_from
from gradkit.train.tokenize import PAIR_PREFIX


class PeftInit(Lora):
    """LoRA initialised by PEFT's ``init_lora_weights=<init>``; subclasses say which and how."""

    init: ClassVar[str] = ""
    changes_base: ClassVar[bool] = True  # the base becomes a residual: saved against the original

    def peft_config(self, model: nn.Module, cfg: TrainConfig) -> LoraConfig:
        """The LoRA config with this method's initialisation (and its own config, if it has one)."""
        return self.lora_config(model, cfg, init_lora_weights=self.init)

    def initialise(self, model: nn.Module, config: LoraConfig, batches: list[dict[str, Any]]) -> nn.Module:
        """PEFT's initialisation: ``get_peft_model`` (the weight-only inits)."""
        return get_peft_model(model, config)

    def prepare(self, model, cfg, batches):
        config = self.peft_config(model, cfg)
        count = settings_from(PeftInitOptions, cfg.options).peft_init_batches
        data = list(itertools.islice(batches, count))
        # PEFT's SVDs and incremental PCA may draw from the global RNG: the run's data order stays as it was
        with torch.random.fork_rng(devices=[]):
            peft_model = self.initialise(model, config, data)
        if self.changes_base:
            record_initial_factors(peft_model)
        return peft_model

    def prepare_for_resume(self, model, cfg):
        """Plain LoRA of the same shape; the checkpoint brings the base, factors and initial factors."""
        return Lora.prepare(self, model, cfg, iter(()))

    def checkpoint_tensors(self, model):
        """The trainable tensors and, where the base became a residual, the residual base weights and the
        initial factors (as LoRA-GA's)."""
        tensors = super().checkpoint_tensors(model)
        return with_initial_factors(model, tensors) if self.changes_base else tensors

    def load_checkpoint_tensors(self, model, tensors):
        if self.changes_base:
            load_with_initial_factors(model, tensors)
        else:
            super().load_checkpoint_tensors(model, tensors)

    def save(self, model, out_dir):
        save_adapter(model, out_dir / "adapter")


def single_texts(batches: list[dict[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
    """Each text of ``batches`` as an encoder input of one text, its padding left out (either side), its
    label not: a bi-encoder pair batch's second texts (the ``pair_`` keys) by their own attention mask,
    after the batch's first texts."""
    for batch in batches:
        first = {k: v for k, v in batch.items() if k != "labels" and not k.startswith(PAIR_PREFIX)}
        second = {k.removeprefix(PAIR_PREFIX): v for k, v in batch.items() if k.startswith(PAIR_PREFIX)}
        for texts in (first, second) if second else (first,):
            mask = texts.get("attention_mask")
            for i in range(len(texts["input_ids"])):
                keep = mask[i].bool() if mask is not None else None
                yield {
                    key: value[i : i + 1][:, keep]
                    if keep is not None and value.shape[1:] == mask.shape[1:]
                    else value[i : i + 1]
                    for key, value in texts.items()
                }


def record_initial_factors(model: nn.Module) -> None:
    """Keep each layer's initial ``(A0, B0)`` where :func:`gradkit.save_adapter` looks for them, so the
    adapter it writes applies the trained change to the original base."""
    for pair in lora_pairs(model):
        records = pair.layer.__dict__.setdefault(RECORD, {})
        records[pair.adapter] = (pair.A.detach().cpu().clone(), pair.B.detach().cpu().clone())


@register_method
class Pissa(PeftInit):
    """LoRA from the principal singular components of each weight (PiSSA, PEFT ``init_lora_weights="pissa"``)."""

    name = "pissa"
    init = "pissa"
    default_lr = 2e-4  # A and B start at the size of the weight's top components, not at 0


@register_method
class Olora(PeftInit):
    """LoRA from a QR decomposition of each weight (OLoRA, PEFT ``init_lora_weights="olora"``)."""

    name = "olora"
    init = "olora"
    default_lr = 2e-4


@register_method
class Corda(PeftInit):
    """LoRA from the context-oriented decomposition ``W C`` (CorDA, PEFT ``preprocess_corda``)."""

    name = "corda"
    init = "corda"
    default_lr = 2e-4

    def peft_config(self, model, cfg):
        from peft.tuners.lora.config import CordaConfig

        method = settings_from(PeftInitOptions, cfg.options).corda_method
        return self.lora_config(
            model, cfg, init_lora_weights="corda", corda_config=CordaConfig(corda_method=method)
        )

    def initialise(self, model, config, batches):
        from peft.tuners.lora.corda import preprocess_corda

        # PEFT's covariance hook reads one sequence per forward: one text at a time through the encoder
        # (a bi-encoder's two texts of a pair each on their own, as its encoder sees them)
        encode = model.embed if isinstance(model, BiEncoderPairModel) else model

        def run_model() -> None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                for text in single_texts(batches):
                    encode(**text)
            model.train(was_training)

        preprocess_corda(model, config, run_model=run_model)
        return get_peft_model(model, config)


@register_method
class Eva(PeftInit):
    """LoRA's ``A`` from the singular vectors of each layer's inputs, ranks redistributed (EVA, PEFT
    ``initialize_lora_eva_weights``); ``B = 0`` and the base unchanged."""

    name = "eva"
    init = "eva"
    changes_base = False
    default_lr = 1e-3  # B starts at 0, as in plain LoRA

    def peft_config(self, model, cfg):
        from peft.tuners.lora.config import EvaConfig

        rho = settings_from(PeftInitOptions, cfg.options).eva_rho
        # a classifier's labels are one per example, not per token: the mask is the attention mask alone
        eva = EvaConfig(rho=rho, use_label_mask=cfg.task == "causal-lm")
        return self.lora_config(model, cfg, init_lora_weights="eva", eva_config=eva)

    def initialise(self, model, config, batches):
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
        was_training = peft_model.training
        peft_model.eval()
        # every rank reads the same whole batches here, so there is nothing to gather
        initialize_lora_eva_weights(
            peft_model, dataloader=batches, gather_distributed_inputs=False, show_progress_bar=False
        )
        peft_model.train(was_training)
        self.rank_pattern = {pair.name: int(pair.A.shape[0]) for pair in lora_pairs(peft_model)}
        return peft_model

    def prepare_for_resume(self, model, cfg):
        """LoRA with the ranks EVA chose (the method's state, read before the model is shaped)."""
        pattern = {name.split("base_model.model.", 1)[-1]: r for name, r in self.rank_pattern.items()}
        config = self.lora_config(model, cfg, rank_pattern=pattern)
        return get_peft_model(model, config)

    def state_dict(self) -> dict[str, Any]:
        return {"rank_pattern": dict(self.rank_pattern)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rank_pattern = dict(state.get("rank_pattern", {}))
