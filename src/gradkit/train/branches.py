"""The critical batch of a harness run, measured by branching from where the run stands (Merrill et
al. 2025, "Critical Batch Size Revisited", arXiv 2505.23971): from the run's weights and optimiser
state, one short run per batch size ``B`` trains on the stream's next examples at the learning rate the
optimiser's law gives for ``B`` (:func:`gradkit.scaling.lr_for_batch`, with the run's measured
``B_simple`` for ``B_noise``, and ``κ² ≈ B_simple`` for Adam), until the held-out loss falls to
``(1 − drop)`` of its value at the branch point. The steps each branch took (interpolated between
evaluations, rounded up to a whole step) give the critical batch by Zhang et al.'s 20% rule
(:func:`gradkit.scaling.critical_batch_size`). Beside it, the Hessian-aware
``B_noise = tr(HΣ)/(GᵀHG)`` at the same point (:func:`gradkit.scaling.hessian.b_noise_hessian`), where
it is positive.

Every branch starts from the same state and reads the same examples (the stream after the run's), and
its dropout is seeded by the run's seed and its batch, so the branches differ only in the batch and
its learning rate, and a rerun repeats them bit for bit. The run itself ends as it stood: the state is
put back after the branches.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from gradkit.errors import GradkitError
from gradkit.scaling.critical_batch import critical_batch_size, steps_to_target
from gradkit.scaling.hessian import b_noise_hessian
from gradkit.scaling.laws import lr_for_batch
from gradkit.train.batching import split_batch
from gradkit.train.evaluate import evaluate

HESSIAN_CHUNKS = 8  # chunks of the Hessian-aware B_noise (two halves of 4)


@dataclass(frozen=True)
class BranchPlan:
    """What the branches do: ``batches`` (the sizes, smallest first), ``drop`` (the held-out loss
    target, a share below the branch point's), ``max_examples`` (a branch that has not reached the
    target by then counts as past the critical batch), ``eval_examples`` (the held-out loss every this
    many examples), ``optimizer`` (``adam`` or ``sgd``: the learning-rate law)."""

    batches: tuple[int, ...]
    drop: float
    max_examples: int
    eval_examples: int
    optimizer: str


def branch_lr(lr: float, batch: int, new_batch: int, b_simple: float, optimizer: str) -> float:
    """The learning rate for ``new_batch`` from ``lr`` at ``batch`` by the optimiser's law with the
    measured ``B_simple``: SGD's ``lr·(1 + B_s/B)/(1 + B_s/B')`` (McCandlish et al. 2018), or Adam's
    sign-descent form with ``κ² = B_s`` and its peak at ``B_s`` (Li et al. 2024)."""
    if optimizer == "sgd":
        return lr_for_batch(lr, batch, new_batch, optimizer="sgd", b_noise=b_simple)
    return lr_for_batch(lr, batch, new_batch, optimizer="adam", kappa=math.sqrt(b_simple), b_noise=b_simple)


class Branches:
    """The branches of one harness run (:class:`gradkit.train.loop.FineTune` after its training, one
    process, with a dev set): :meth:`measure` runs them and returns the record ``summary.json`` keeps."""

    def __init__(self, run: Any, plan: BranchPlan, b_simple: float):
        self.run, self.plan, self.b_simple = run, plan, b_simple
        self.model, self.optimizer = run.model, run.optimizer
        self.weights = {k: v.detach().clone() for k, v in run.unwrapped.state_dict().items()}
        self.optimizer_state = copy.deepcopy(run.optimizer.state_dict())
        self.lr = run.scheduler.get_last_lr()[0]
        if not self.lr > 0:
            raise GradkitError(
                f"the run's learning rate is {self.lr:g} at its end (a schedule that decays to 0): the "
                "branches' lrs scale it; branch from a run with a constant schedule"
            )
        # the first example after the run's: every branch reads the stream from here
        self.first = run.batches.span(run.state.step + 1)[0]
        self.start_loss = self.held_out_loss()
        self.target = (1.0 - plan.drop) * self.start_loss
        self.curves: dict[int, list[list[float]]] = {}
        self.progress = True

    def held_out_loss(self) -> float:
        """The mean loss on the dev set (eval mode)."""
        cfg = self.run.cfg
        metrics = evaluate(
            self.run.unwrapped, self.run.dev_tokens, cfg.eval_batch_size, self.run.device, "dev"
        )
        return metrics["dev_loss"]

    def restore(self) -> None:
        """The weights and optimiser state of the branch point."""
        self.run.unwrapped.load_state_dict(self.weights)
        self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))

    def _step(self, batch: dict[str, torch.Tensor]) -> None:
        """One optimiser step on ``batch``, accumulated over parts of at most ``--batch-size`` examples
        (the run's memory)."""
        for part, weight in split_batch(batch, max_examples=self.run.cfg.batch_size, trim=False):
            self.run.accelerator.backward(self.model(**part).loss * weight)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def branch(self, batch: int) -> float | None:
        """Train at ``batch`` from the branch point until the held-out loss reaches the target: the
        steps it took (:func:`~gradkit.scaling.critical_batch.steps_to_target`), or None within
        ``max_examples``."""
        self.restore()
        lr = branch_lr(self.lr, self.run.cfg.batch_size, batch, self.b_simple, self.plan.optimizer)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(self.run.cfg.seed * 1_000_003 + batch)  # this branch's dropout
        every = max(1, round(self.plan.eval_examples / batch))
        curve = [[0.0, self.start_loss]]
        self.model.train()
        steps = self.plan.max_examples // batch
        bar = tqdm(total=steps, desc=f"batch {batch}", leave=False, disable=not self.progress)
        for step in range(1, steps + 1):
            self._step(self.run.batches.examples(self.first + (step - 1) * batch, batch))
            bar.update()
            if step % every == 0:
                curve.append([float(step), self.held_out_loss()])
                bar.set_postfix(held_out=f"{curve[-1][1]:.4f}", target=f"{self.target:.4f}")
                if curve[-1][1] <= self.target:
                    break
        bar.close()
        self.curves[batch] = curve
        return steps_to_target(curve, self.target)

    def hessian_b_noise(self) -> float | None:
        """``B_noise = tr(HΣ)/(GᵀHG)`` at the branch point on ``HESSIAN_CHUNKS`` chunks of the stream's
        next examples, a micro-batch each, in eval mode (None where ``GᵀHG`` is not positive)."""
        self.restore()
        size = max(1, self.run.cfg.batch_size // 2)
        chunks = [self.run.batches.examples(self.first + i * size, size) for i in range(HESSIAN_CHUNKS)]
        model = self.run.unwrapped
        model.eval()
        try:
            with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
                result = b_noise_hessian(model, lambda m, chunk: m(**chunk).loss, chunks, size)
        finally:
            model.train()
        return result.b_noise

    def measure(self, *, progress: bool = True) -> dict[str, Any]:
        """Every branch, the critical batch, ``B_noise``; then the branch point's state again."""
        plan, self.progress = self.plan, progress
        try:
            steps = [self.branch(b) for b in tqdm(plan.batches, desc="branches", disable=not progress)]
            b_noise = self.hessian_b_noise()
        finally:
            self.restore()
        cfg = self.run.cfg
        record = {
            "step": self.run.state.step,
            "optimizer": plan.optimizer,
            "held_out_loss": self.start_loss,
            "drop": plan.drop,
            "target": self.target,
            "b_simple": self.b_simple,
            "b_noise": b_noise,
            "batches": list(plan.batches),
            "lr": [
                branch_lr(self.lr, cfg.batch_size, b, self.b_simple, plan.optimizer) for b in plan.batches
            ],
            "steps": steps,
            "curves": {str(b): self.curves[b] for b in plan.batches},
        }
        if all(s is None for s in steps):  # nothing to read a critical batch from: say what to change
            text = "no branch reached the target: lower --branch-drop or raise --branch-examples"
            return {**record, "overhead": [None] * len(steps), "critical_batch": None, "critical_text": text}
        result = critical_batch_size(plan.batches, steps)
        return {
            **record,
            "overhead": [r if math.isfinite(r) else None for r in result.overhead],
            "critical_batch": result.value,
            "critical_low": result.low,
            "critical_high": result.high,
            "critical_text": result.describe(),
        }
