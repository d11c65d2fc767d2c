"""Zeroth-order training inside Hugging Face's ``Trainer``: ``ZOTrainer(model=..., args=..., ...)``.

The Trainer keeps everything but the step: the data loader and its seeded order, the learning-rate
schedule, logging, evaluation, ``save_strategy`` checkpoints and ``resume_from_checkpoint``, and DDP
through accelerate. Its training step is :class:`gradkit.ZerothOrder`'s instead of forward + backward:

- ``training_step`` turns dropout off (as MeZO does: two evaluations with different masks would make
  their difference mostly noise), builds a closure that returns the batch's loss from the Trainer's
  own ``compute_loss`` (mean over processes, so every rank takes the same step), and takes the
  zeroth-order step with it; the loss it returns is the step's estimate of ``f(θ)``.
- The Trainer then calls ``optimizer.step()`` with no closure, as after every backward: the step was
  already taken, so that call does nothing (:class:`TrainerZerothOrder`). Gradient clipping finds no
  gradients and changes nothing.
- The optimiser is built from the trainable parameters (``requires_grad``) at ``args.learning_rate``
  with ``args.weight_decay`` (decoupled, skipping 1-D tensors) and ``args.seed``; ``zo_kwargs`` are
  :class:`gradkit.ZerothOrder`'s own (``estimator``, ``eps``, ``n_samples``, ``distribution``, ...).
  ``exact`` names the parameters trained by their exact gradient in the same step (a predicate on the
  parameter's name), at ``exact_lr``; their gradient is averaged over processes.
- Checkpoints hold the optimiser's ``state_dict``, the private generator of the directions included, so
  a run resumed from a checkpoint takes the same steps as one that never stopped.
- ``estimator="svrg"``: the Trainer hands one batch per step, so an anchor step's estimate reads that
  step's batch (raise ``per_device_train_batch_size`` for a larger one; the harness's
  ``--zo-svrg-batches`` averages several). The anchor ``θ̄`` is in the optimiser's state and so in
  every checkpoint.

Gradient accumulation is refused: a zeroth-order step compares losses of one batch at nearby weights
and has no gradient to accumulate; raise ``per_device_train_batch_size`` instead (memory grows only
with the activations of a forward). FSDP is not supported here (the harness's ``mezo --fsdp`` is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradkit.errors import GradkitError
from gradkit.optim.zeroth_order import ZerothOrder
from gradkit.optim.zo_exact import mean_keeping_graph, split_exact

try:  # transformers is optional for the rest of gradkit
    from transformers import Trainer as _Base
except ImportError:  # pragma: no cover - exercised only without transformers
    _Base = object

__all__ = ["TrainerZerothOrder", "ZOTrainer"]


class TrainerZerothOrder(ZerothOrder):
    """:class:`ZerothOrder` whose ``step()`` without a closure does nothing: the Trainer calls it after
    ``training_step``, which has already taken the step with the batch's closure."""

    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        if closure is None:
            return self.last_loss
        return super().step(closure)


class ZOTrainer(_Base):
    """A ``transformers.Trainer`` whose training step is a zeroth-order step (see the module docstring).

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        zo_kwargs: keyword arguments of :class:`gradkit.ZerothOrder` (``estimator``, ``eps``,
            ``n_samples``, ``distribution``, ``restore``, ...); ``lr``, ``weight_decay`` and ``seed``
            come from the ``TrainingArguments``.
        exact: ``exact(name) -> bool`` picks the trainable parameters trained by their exact gradient
            (e.g. ``lambda name: name.startswith("score.")`` for a classification head).
        exact_lr: the SGD learning rate of those parameters.
    """

    def __init__(
        self,
        *args: Any,
        zo_kwargs: dict[str, Any] | None = None,
        exact: Callable[[str], bool] | None = None,
        exact_lr: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if _Base is object:
            raise GradkitError("ZOTrainer needs transformers; install it with `pip install transformers`")
        self.zo_kwargs = dict(zo_kwargs or {})
        taken = sorted({"lr", "weight_decay", "seed", "params", "exact_params"} & set(self.zo_kwargs))
        if taken:
            raise GradkitError(
                f"zo_kwargs {', '.join(taken)}: ZOTrainer takes them from the TrainingArguments "
                "(learning_rate, weight_decay, seed) and the model (exact=...); drop them from zo_kwargs"
            )
        self.exact, self.exact_lr = exact, exact_lr
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise GradkitError(
                f"ZOTrainer with gradient_accumulation_steps={self.args.gradient_accumulation_steps}: a "
                "zeroth-order step compares losses of one batch and has no gradient to accumulate; set it "
                "to 1 and raise per_device_train_batch_size instead"
            )
        if getattr(self, "is_fsdp_enabled", False):
            raise GradkitError("ZOTrainer does not support the Trainer's fsdp options; drop fsdp=")

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """:class:`TrainerZerothOrder` over the trainable parameters, the ``exact`` ones in their own
        group at ``exact_lr``."""
        if self.optimizer is None:
            zeroth, picked = split_exact((model or self.model).named_parameters(), self.exact)
            self.optimizer = TrainerZerothOrder(
                zeroth,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                seed=self.args.seed,
                exact_params=[{"params": picked, "lr": self.exact_lr}] if picked else None,
                **self.zo_kwargs,
            )
        return self.optimizer

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One zeroth-order step on ``inputs``; returns its estimate of the loss at ``θ``."""
        inputs = self._prepare_inputs(inputs)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                local = self.compute_loss(model, inputs).float()
            # the same value on every rank; with exact parameters, this rank's graph
            return mean_keeping_graph(local, self.accelerator.reduce(local.detach(), reduction="mean"))

        model.eval()  # no dropout in the evaluations, as in MeZO
        try:
            loss = optimizer.step(closure)
        finally:
            model.train()
        return loss.detach().to(self.args.device)
