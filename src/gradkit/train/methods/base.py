"""The methods registry and the base class: each fine-tuning method is a small object that prepares
the model and the optimiser and takes one training step. Every method shares the loop, data order,
schedule and evaluation in :mod:`gradkit.train.loop`, so comparisons differ in the method alone.

A new method subclasses :class:`Method` and registers itself::

    @register_method
    class MyMethod(Method):
        name = "my-method"
        default_lr = 1e-4
        def prepare(self, model, cfg, batches): ...

its module is imported by :mod:`gradkit.train.methods`, and its entry in
:data:`gradkit.train.method_options.CATALOGUE` (a one-line summary, its option groups) is what the
command line shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from gradkit.errors import GradkitError
from gradkit.files import atomic_path
from gradkit.fsdp import clip_grad_norm_, reshard
from gradkit.train.batching import split_batch
from gradkit.train.checkpoint import load_tensors
from gradkit.train.config import TrainConfig
from gradkit.train.optimizers import build_optimizer

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``gradkit finetune --method cls.name``."""
    METHODS[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Method]]:
    """Every registered method by name (importing :mod:`gradkit.train.methods` registers gradkit's own)."""
    return METHODS


def get_method(name: str) -> Method:
    """A new instance of the method registered as ``name``, or one clear error listing the names."""
    if name not in METHODS:
        raise GradkitError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]()


class Method:
    """Base class: full backprop through whatever ``prepare`` left trainable, AdamW, grad clipping."""

    name: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1e-4
    # reads each micro-batch's gradient (the noise scale of --batch-schedule noise; set by the loop)
    gradient_monitor: Any = None

    def prepare(self, model: nn.Module, cfg: TrainConfig, batches: Iterable[dict[str, Any]]) -> nn.Module:
        """Return the model to train (e.g. PEFT-wrapped) with ``requires_grad`` set as the method needs.

        ``batches`` iterates over training batches (same data and order as training) for methods
        that look at data before training (LoRA-GA); most ignore it.
        """
        return model

    def prepare_for_resume(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        """The model as :meth:`prepare` shapes it, without looking at data: a resumed run then loads
        the checkpoint's tensors into it (default: ``prepare`` with no batches)."""
        return self.prepare(model, cfg, iter(()))

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must hold to resume exactly: default, every trainable parameter.
        A method whose :meth:`prepare` changes frozen tensors (LoRA-GA's base offset) adds them.
        Under FSDP2 these are the sharded parameters (DTensors)."""
        reshard(model)  # after a forward alone FSDP2 leaves the root's unsharded parameters registered
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_checkpoint_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put :meth:`checkpoint_tensors` back (by name, exactly)."""
        load_tensors(model, tensors)

    def state_dict(self) -> dict[str, Any]:
        """The method's own state beyond the model and optimiser (a private generator...), for
        checkpoints; default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def make_optimizer(self, model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
        """``--optimizer`` over the trainable parameters at ``lr`` (:mod:`gradkit.train.optimizers`:
        AdamW by default, with weight decay off biases and norms)."""
        return build_optimizer(model, cfg, lr)

    def step_batch(self, batches: Any, step: int, optimizer: torch.optim.Optimizer) -> Any:
        """What step ``step`` (1-based) trains on: this process's share of its batch
        (:class:`gradkit.train.datasets.StepBatches`); a method may read more."""
        return batches.step(step)

    def train_step(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        accelerator: Any,
        cfg: TrainConfig,
    ) -> torch.Tensor:
        """One optimisation step on ``batch`` (this process's share of the step's examples); returns
        the (local) mean loss, detached. The batch is cut into parts (:func:`parts_of`) whose
        gradients accumulate to the whole batch's."""
        monitor = self.gradient_monitor
        if monitor is None:
            parts = parts_of(batch, cfg, accelerator)
        else:  # random subsets of the batch, at least as many as the noise scale needs
            parts = parts_of(batch, cfg, accelerator, min_parts=monitor.min_parts, by_length=False)
        loss = accumulate_gradients(model, parts, accelerator, monitor)
        if monitor is not None:
            monitor.step()  # before clipping: the gradient as the batch gave it
        if cfg.max_grad_norm:
            clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def step_metrics(self) -> dict[str, Any]:
        """Extra values for this step's line of metrics.jsonl (default: none)."""
        return {}

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Save what the method trained. Default: the trainable tensors as safetensors."""
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        with atomic_path(out_dir / "trainable.safetensors") as tmp:
            save_file(tensors, str(tmp))


def parts_of(
    batch: dict[str, Any], cfg: TrainConfig, accelerator: Any, *, min_parts: int = 1, by_length: bool = True
) -> list[tuple[dict[str, Any], float]]:
    """This process's batch cut into weighted parts (:func:`gradkit.train.batching.split_batch`): at most
    ``batch_size / processes`` examples each (``--grad-accum`` K gives K or more parts), sorted by
    length with little padding unless ``--no-trim-padding`` or a loss of the whole batch (CoSENT ranks
    every pair of the batch: its parts are consecutive, one unless ``--grad-accum``, and the ranking is
    over each part), and at least ``min_parts`` parts where the batch has the examples (the noise
    scale needs two batch sizes). ``by_length=False``: consecutive parts in the stream's (shuffled)
    order, so each part is a random subset of the batch, as the noise scale's estimator assumes (parts
    sorted by length would differ systematically). With per-token labels (a causal LM) on
    several processes the weights are scaled so that the mean over ranks is the global token mean."""
    limit = cfg.batch_size // accelerator.num_processes
    trim = by_length and cfg.trim_padding and cfg.pair_loss != "cosent"
    parts = split_batch(batch, max_examples=limit, trim=trim)
    examples = len(batch["labels"])
    if len(parts) < min_parts <= examples:
        parts = split_batch(batch, max_examples=-(-examples // min_parts), trim=trim)
    labels = batch["labels"]
    if labels.ndim == 2 and accelerator.num_processes > 1:
        # a token mean (causal LM): the ranks hold different numbers of labelled tokens T_r, and DDP
        # averages their gradients equally; scaling rank r's weights by P * T_r / T makes the average
        # (1/P) sum_r (P T_r / T) L_r = sum_r (T_r / T) L_r, the global batch's token mean
        local = (labels[:, 1:] != -100).sum().float()
        total = accelerator.reduce(local.clone(), reduction="sum")
        scale = float(local * accelerator.num_processes / total)
        parts = [(part, weight * scale) for part, weight in parts]
    return parts


def accumulate_gradients(
    model: nn.Module, parts: list[tuple[dict[str, Any], float]], accelerator: Any, monitor: Any = None
):
    """Backward ``w_c * loss_c`` for every part, so ``.grad`` ends as the whole batch's mean gradient;
    under DDP only the last part's backward all-reduces (the others run in ``no_sync``). ``monitor``
    (``micro_step(examples)``: :class:`gradkit.train.batch_growth.GrowingBatch`, or a
    :class:`gradkit.scaling.accumulation.GradNormRecorder`) reads each part's gradient after its backward. Returns the batch's mean loss, detached."""
    total = None
    for i, (part, weight) in enumerate(parts):
        last = i == len(parts) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = model(**part).loss
            accelerator.backward(loss * weight)
        if monitor is not None:
            monitor.micro_step(len(part["labels"]))
        value = loss.detach().float() * weight
        total = value if total is None else total + value
    return total
