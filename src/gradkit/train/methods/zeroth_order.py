"""Harness methods without backprop through the objective: ``mezo`` (zeroth order, MeZO:
Malladi et al. 2023, arXiv 2305.17333) and ``policy-gradient`` (REINFORCE, Williams 1992).

``mezo`` trains with :class:`gradkit.ZerothOrder`: two forward passes per direction (``--zo-estimator
spsa``, MeZO's), one base forward and ``N`` probes (``fzoo``), or MeZO-SVRG's ``svrg`` (an anchor step
over ``--zo-svrg-batches`` step batches every ``--zo-svrg-every`` steps, four forwards per direction
in between), no backward, so training needs the memory of inference (``svrg``: plus one copy of the
trained weights). ``--zo-exact head`` trains the classification head with its exact gradient in the
same step (a backward through the head alone; the encoder's forward records no graph).
``--objective accuracy`` or ``f1`` optimises the batch metric of argmax predictions directly (the
closure returns ``1 - metric``), something no gradient reaches. ``policy-gradient`` samples labels
from ``softmax(logits / T)``, rewards the correct ones and follows the REINFORCE gradient with AdamW:
the same kind of objective, seen from the score-function side (``docs/zeroth_order.md`` shows the
two agree).

Under data parallelism (``accelerate launch`` / ``torchrun``) every rank builds ``ZerothOrder``
with the run's seed, so every rank draws the same directions; the closure all-reduces only scalars
(the loss, or the metric's counts), so every rank computes the same step (an exact head's gradient
is averaged over the ranks as well). ``policy-gradient`` uses
the ordinary DDP gradient all-reduce.

The logged "loss" is what each method optimises: the cross-entropy for ``--objective loss``,
``1 - accuracy`` or ``1 - F1`` of the batch for the metric objectives, and ``1 - mean reward`` (the
error rate of the sampled labels) for ``policy-gradient``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.estimators import policy_gradient_loss
from gradkit.fsdp import clip_grad_norm_
from gradkit.optim.zeroth_order import ZerothOrder
from gradkit.optim.zo_exact import mean_keeping_graph, split_exact
from gradkit.train.batching import forward_parts
from gradkit.train.config import TrainConfig
from gradkit.train.method_options import ZO_DEFAULT_SAMPLES, ZerothOrderOptions
from gradkit.train.methods.base import Method, parts_of, register_method
from gradkit.train.methods.lora import Lora
from gradkit.train.settings import settings_from


def _prepare_params(method: Lora, model: nn.Module, cfg: TrainConfig, which: str) -> nn.Module:
    """``lora``: PEFT LoRA (like the ``lora`` method) with the head trainable; ``head``: the head
    only; ``all``: every weight. ``requires_grad`` marks what trains (no gradient is ever taken by
    ``mezo``; the flag is how the harness counts and saves the trained tensors)."""
    if which == "lora":
        return Lora.prepare(method, model, cfg, [])
    for name, param in model.named_parameters():
        param.requires_grad_(which == "all" or name.startswith("head."))
    return model


def is_head(name: str) -> bool:
    """A parameter of the classification head (``head.weight``, or PEFT's trained copy
    ``base_model.model.head.modules_to_save.default.weight``)."""
    return "head" in name.split(".")


def _save(method: Lora, model: nn.Module, out_dir) -> None:
    """A PEFT model saves its adapter (like ``lora``); otherwise the trained tensors (like ``head``)."""
    if hasattr(model, "peft_config"):
        Lora.save(method, model, out_dir)
    else:
        Method.save(method, model, out_dir)


def objective_value(
    logits: torch.Tensor, labels: torch.Tensor, objective: str, accelerator: Any, loss: torch.Tensor | None
) -> torch.Tensor:
    """The value to minimise on this batch, identical on every rank: the loss (mean over ranks,
    whose slices are equal-sized), or ``1 - metric`` of argmax predictions computed from counts
    summed over ranks (a global F1 needs global counts, not a mean of per-rank F1s).

    A loss with a graph (``--zo-exact head``) keeps it: the value is the mean over ranks bit for bit
    (``local - local.detach()`` is exactly 0) and the gradient is this rank's, which
    :class:`gradkit.ZerothOrder` averages over ranks."""
    if objective == "loss":
        local = loss.float()
        return mean_keeping_graph(local, accelerator.reduce(local.detach(), reduction="mean"))
    preds = logits.argmax(-1)
    if objective == "accuracy":
        counts = torch.stack([(preds == labels).sum(), torch.tensor(labels.numel(), device=labels.device)])
        counts = accelerator.reduce(counts.float(), reduction="sum")
        return 1.0 - counts[0] / counts[1]
    num_classes = logits.shape[-1]
    classes = torch.arange(num_classes, device=labels.device)
    hit_pred = preds.unsqueeze(0) == classes.unsqueeze(1)  # (C, B)
    hit_true = labels.unsqueeze(0) == classes.unsqueeze(1)
    counts = torch.stack(
        [(hit_pred & hit_true).sum(1), (hit_pred & ~hit_true).sum(1), (~hit_pred & hit_true).sum(1)]
    )
    tp, fp, fn = accelerator.reduce(counts.float(), reduction="sum")
    denom = 2 * tp + fp + fn
    present = denom > 0  # a class absent from predictions and labels has no F1 (left out, as in macro_f1)
    f1 = (2 * tp[present] / denom[present]).mean() if present.any() else torch.tensor(0.0)
    return 1.0 - f1


@register_method
class Mezo(Lora):
    """Zeroth-order fine-tuning (MeZO): two forwards per step along a seeded random direction, no
    backward; LoRA + head by default."""

    name = "mezo"
    default_lr = 1e-4  # SGD on a noisy n-dim estimate: far below AdamW's; sweep it (see docs)

    def prepare(self, model, cfg, batches):
        options = settings_from(ZerothOrderOptions, cfg.options)
        objective = options.objective
        if cfg.task == "regression" and objective != "loss":
            raise GradkitError(
                f"--objective {objective} scores argmax predictions of classes, and --task regression has "
                "none; use --objective loss"
            )
        return _prepare_params(self, model, cfg, options.zo_params)

    def save(self, model, out_dir):
        _save(self, model, out_dir)

    def make_optimizer(self, model, cfg, lr):
        options = settings_from(ZerothOrderOptions, cfg.options)
        zeroth, exact = split_exact(model.named_parameters(), is_head if options.zo_exact == "head" else None)
        self._svrg_batches = options.zo_svrg_batches
        return ZerothOrder(
            zeroth,
            lr=lr,
            eps=options.zo_eps,
            n_samples=options.zo_samples or ZO_DEFAULT_SAMPLES[options.zo_estimator],
            distribution=options.zo_distribution,
            weight_decay=cfg.weight_decay,
            seed=cfg.seed,  # the same on every rank: the same directions everywhere
            estimator=options.zo_estimator,
            exact_params=[{"params": exact, "lr": options.zo_exact_lr}] if exact else None,
            svrg_every=options.zo_svrg_every,
            anchor_lr_scale=options.zo_svrg_anchor_lr_scale,
        )

    def step_batch(self, batches, step, optimizer):
        """``svrg``'s anchor step reads the step batches ``step .. step + zo_svrg_batches - 1`` (a list);
        every other step its own batch. A function of the step and the optimiser's saved state alone, so
        a resumed run reads the same data."""
        zeroth = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        if not zeroth.anchor_due:
            return batches.step(step)
        return [batches.step(step + i) for i in range(self._svrg_batches)]

    def train_step(self, model, batch, optimizer, accelerator, cfg):
        objective = settings_from(ZerothOrderOptions, cfg.options).objective
        # less padding; the objective is each batch's whole (an svrg anchor: the mean over its batches)
        batches = [parts_of(b, cfg, accelerator) for b in (batch if isinstance(batch, list) else [batch])]

        def one(parts) -> torch.Tensor:
            if cfg.task == "causal-lm":  # the token-weighted mean loss; logits of parts differ in length
                loss = sum(model(**part).loss * weight for part, weight in parts)
                return objective_value(None, None, "loss", accelerator, loss)
            loss, logits, labels = forward_parts(model, parts)
            return objective_value(logits, labels, objective, accelerator, loss)

        def closure() -> torch.Tensor:
            return one(batches[0]) if len(batches) == 1 else sum(one(p) for p in batches) / len(batches)

        was_training = model.training
        # no dropout during the two evaluations (as in MeZO): with different masks, f+ - f- would be noise
        model.eval()
        try:
            optimizer.step(closure)  # accelerate's wrapper returns None; the loss is kept on the optimiser
        finally:
            model.train(was_training)
        return getattr(optimizer, "optimizer", optimizer).last_loss.detach()


@register_method
class PolicyGradient(Lora):
    """REINFORCE on the classifier: sample a label from softmax(logits / T), reward 1 if correct,
    AdamW on the policy-gradient surrogate (LoRA + head by default, ``--zo-params head`` for the head)."""

    name = "policy-gradient"
    default_lr = 1e-3

    def prepare(self, model, cfg, batches):
        if cfg.task == "regression":
            raise GradkitError(
                "policy-gradient samples class labels, and --task regression has none; use mezo, lora or "
                "full for regression"
            )
        return _prepare_params(self, model, cfg, settings_from(ZerothOrderOptions, cfg.options).zo_params)

    def save(self, model, out_dir):
        _save(self, model, out_dir)

    def make_optimizer(self, model, cfg, lr):
        return Method.make_optimizer(self, model, cfg, lr)

    def train_step(self, model, batch, optimizer, accelerator, cfg):
        temperature = settings_from(ZerothOrderOptions, cfg.options).pg_temperature
        if not hasattr(self, "_generator"):
            # private sampling stream, different on every rank (each rank samples its own slice)
            self._generator = torch.Generator(device=batch["labels"].device).manual_seed(
                cfg.seed * 1_000_003 + accelerator.process_index
            )
            saved = getattr(self, "_saved_generator", None)
            if saved is not None:  # a resumed run continues the sampling stream
                self._generator.set_state(saved)
        # every part's logits with their graph, then one loss: the mean-reward baseline is the batch's
        parts = [part for part, _ in parts_of(batch, cfg, accelerator)]
        logits = torch.cat([model(**{k: v for k, v in p.items() if k != "labels"}).logits for p in parts])
        logits = logits.float() / temperature
        labels = torch.cat([p["labels"] for p in parts])
        with torch.no_grad():
            actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=self._generator).squeeze(-1)
            rewards = (actions == labels).float()
        loss = policy_gradient_loss(logits, actions, rewards, baseline="mean")
        accelerator.backward(loss)
        if cfg.max_grad_norm:
            clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 1.0 - rewards.mean()

    def state_dict(self):
        generator = getattr(self, "_generator", None)
        return {"generator": generator.get_state()} if generator is not None else {}

    def load_state_dict(self, state):
        self._saved_generator = state.get("generator")
