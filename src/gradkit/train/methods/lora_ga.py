"""Harness method ``lora-ga``: PEFT LoRA initialised with LoRA-GA (arXiv 2407.05000) from the first
``--ga-batches`` training batches, then trained like ``lora`` (AdamW on A, B and the head).

The saved adapter is :func:`gradkit.save_adapter`'s rank-2r difference form, so it loads with plain
``PeftModel.from_pretrained`` onto the original, untouched base model.

Defaults, and why:

- ``--ga-scale stable`` (``out^(1/4) / sqrt(16)`` on both factors): the paper's recommended setting,
  the one its ablation pairs with the gradient init for its best results, and PEFT's default, so a
  comparison with PEFT's LoRA-GA differs in the faithful split alone.
- ``--ga-estimator exact``: the reference (one fp32 gradient per target weight, what the paper does);
  ``sketch`` holds a fraction of that memory (one pass over the batches; rank-2r error measured a few
  per cent above optimal on MiniLM, see docs/lora_ga.md) for models where full gradients do not fit.
- ``default_lr = 4e-4``: measured, not assumed. LoRA-GA's authors report its best learning rate near
  full fine-tuning's, not LoRA's; on MiniLM + SST-2 (benchmarks/lora_quality.py, 100 steps) the best of
  5e-5, 2e-4, 4e-4, 8e-4 and 1.6e-3 was 4e-4 (mean train loss 0.4562 over 3 seeds, 8e-4: 0.4634),
  between full fine-tuning's best (2e-4) and LoRA's (2e-3). With ``--rslora`` s grows by sqrt(r):
  divide the learning rate by about sqrt(r).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from gradkit.errors import GradkitError
from gradkit.files import write_json
from gradkit.lora.export import save_adapter
from gradkit.lora.ga import RECORD, lora_ga_init
from gradkit.lora.pairs import lora_pairs
from gradkit.train.checkpoint import load_tensors
from gradkit.train.config import TrainConfig
from gradkit.train.method_options import LoraGAOptions
from gradkit.train.methods.base import register_method
from gradkit.train.methods.lora import Lora
from gradkit.train.model import quiet_transformers
from gradkit.train.precision import autocast
from gradkit.train.settings import settings_from
from gradkit.train.sharding import shard_model


def _rank_share(batches: Iterable[Any], count: int) -> Iterator[Any]:
    """This process's share of the first ``count`` batches (every world-size-th one): the harness gives
    every rank the same whole batches, and lora_ga_init all-reduces, so each batch is used exactly once."""
    world, rank = 1, 0
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return itertools.islice(batches, rank, count, world)


def _bf16_loss(model: nn.Module, batch: dict[str, Any]):
    """``model(**batch).loss`` with the forward in bf16 autocast (``--precision bf16``: the gradient
    LoRA-GA estimates is the one training will follow); the weights, their gradients, the SVD and the
    base offset stay fp32, since only this forward is autocast."""
    with autocast("bf16", next(model.parameters()).device.type):
        loss = model(**batch).loss
    return loss.float()


def _check_even_share(cfg: TrainConfig, count: int) -> None:
    """Under ``--fsdp`` each backward is a collective (reduce-scatter): the ranks must get equally many
    of the ``min(count, steps x grad-accum)`` estimation batches."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    used = min(count, cfg.steps * cfg.grad_accum)
    if used % world:
        raise GradkitError(
            f"--fsdp with --method {cfg.method}: the {used} LoRA-GA batches do not split evenly over {world} "
            f"processes (each backward is collective); pass --ga-batches as a multiple of {world}"
        )


@register_method
class LoraGA(Lora):
    """PEFT LoRA whose factors start from the SVD of the full fine-tuning gradient (LoRA-GA)."""

    name = "lora-ga"
    default_lr = 4e-4  # the measured best (see the module docstring)

    def prepare(self, model: nn.Module, cfg: TrainConfig, batches: Iterable[dict[str, Any]]) -> nn.Module:
        options = settings_from(LoraGAOptions, cfg.options)
        peft_model = super().prepare(model, cfg, batches)
        if cfg.fsdp:
            # --fsdp: shard first, so that the exact estimator sums each rank's rows of the reduce-scattered
            # gradients (no whole gradient on any rank); every rank must run as many backwards
            _check_even_share(cfg, options.ga_batches)
            peft_model = shard_model(peft_model)
        self.report = lora_ga_init(
            peft_model,
            _rank_share(batches, options.ga_batches),
            loss_fn=_bf16_loss if cfg.precision == "bf16" else None,
            estimator=options.ga_estimator,
            sketch_passes=options.ga_sketch_passes,
            scale=options.ga_scale,
            stable_gamma=options.ga_gamma,
            seed=cfg.seed,
        )
        return peft_model

    def prepare_for_resume(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        """The PEFT model without the estimation: the checkpoint brings the offset base weights and the
        initial factors back."""
        return Lora.prepare(self, model, cfg, iter(()))

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, Any]:
        return with_initial_factors(model, super().checkpoint_tensors(model))

    def load_checkpoint_tensors(self, model: nn.Module, tensors: dict[str, Any]) -> None:
        load_with_initial_factors(model, tensors)

    def report_data(self) -> dict[str, Any] | None:
        """The initialisation's report (lora_ga.json) as plain data: this session's, or the one a resumed
        session read from its checkpoint, so that every later checkpoint carries it on, however many
        resumes follow."""
        report = getattr(self, "report", None)
        return report.to_dict() if report is not None else getattr(self, "report_dict", None)

    def state_dict(self) -> dict[str, Any]:
        data = self.report_data()
        return {"report": data} if data is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.report_dict = state.get("report")

    def save(self, model: nn.Module, out_dir: Path) -> None:
        with quiet_transformers():
            save_adapter(model, out_dir / "adapter")
        data = self.report_data()
        if data is not None:
            write_json(out_dir / "lora_ga.json", data)


def with_initial_factors(model: nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's tensors plus, for every adapted layer, its offset base weight and its initial factors
    (A0, B0) that :func:`gradkit.save_adapter` subtracts (keys ``<layer>.gradkit_lora_ga.A0|B0``). The
    initial factors may be slices of an SVD (views with strides): they are returned contiguous, since
    safetensors saves nothing else (the checkpoint and the best-on-dev copy)."""
    tensors = dict(tensors)
    for pair in lora_pairs(model):
        weight = pair.layer.get_base_layer().weight
        tensors[f"{pair.name}.base_layer.weight"] = weight.detach()
        A0, B0 = pair.layer.__dict__[RECORD][pair.adapter]
        tensors[f"{pair.name}.{RECORD}.A0"] = A0.contiguous()
        tensors[f"{pair.name}.{RECORD}.B0"] = B0.contiguous()
    return tensors


def load_with_initial_factors(model: nn.Module, tensors: dict[str, Any]) -> None:
    """Put :func:`with_initial_factors`'s tensors back: the initial factors into each layer's record, the
    rest (offset base weights included) into the model by name."""
    tensors = dict(tensors)
    for pair in lora_pairs(model):
        A0 = tensors.pop(f"{pair.name}.{RECORD}.A0")
        B0 = tensors.pop(f"{pair.name}.{RECORD}.B0")
        pair.layer.__dict__.setdefault(RECORD, {})[pair.adapter] = (A0.clone(), B0.clone())
    load_tensors(model, tensors)
