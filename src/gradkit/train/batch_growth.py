"""The harness's growing batch (``--batch-schedule noise|ramp``): a loop component that holds the
:class:`~gradkit.scaling.batch_schedule.BatchSchedule`, measures the noise scale from the micro-batches
the step runs anyway, resizes the step batches and scales the learning rate.

The budget is counted in base batches: ``cfg.steps`` is ``--examples / B_0`` (``B_0`` = ``--batch-size``
x ``--grad-accum``), and a step of ``k`` base batches uses ``k`` of it. The learning-rate schedule is a
function of the base batches used, ``u``, so that a fixed batch gives exactly the step schedule of an
unscheduled run (``u`` = step): linear warm-up over the first ``ceil(warmup_ratio · steps)`` and linear
decay to 0 at ``steps`` (transformers' ``get_linear_schedule_with_warmup``), or constant, times the
schedule's :attr:`~gradkit.scaling.batch_schedule.BatchSchedule.lr_factor`. The last step takes only
the base batches left, so every schedule trains on the same examples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from gradkit.scaling.batch_schedule import BatchSchedule
from gradkit.scaling.noise_scale import NoiseScale
from gradkit.train.config import TrainConfig
from gradkit.train.datasets import StepBatches

# the horizon of the noise scale's smoothing (about 1 / (1 - beta) steps)
NOISE_BETA = 0.95


def lr_fraction(used: float, steps: int, warmup_ratio: float, schedule: str) -> float:
    """The share of the peak lr after ``used`` of ``steps`` base batches: 1 (constant), or
    ``used / w`` while ``used < w = ceil(warmup_ratio · steps)`` then ``max(0, (steps − used) /
    max(1, steps − w))`` (linear warm-up, then linear decay to 0)."""
    if schedule == "constant":
        return 1.0
    warmup = math.ceil(warmup_ratio * steps)
    if used < warmup:
        return float(used) / float(max(1, warmup))
    return max(0.0, float(steps - used) / float(max(1, steps - warmup)))


def default_batch_max(step_examples: int, train_rows: int) -> int:
    """64 base batches, or the most that fit the training rows (at least one)."""
    return step_examples * max(1, min(64, train_rows // step_examples))


def with_budget(cfg: TrainConfig, train_rows: int) -> TrainConfig:
    """``cfg`` with ``--examples`` as ``steps`` (base batches) and a growing schedule's defaults
    filled in: ``--batch-max`` (:func:`default_batch_max`), ``--batch-ramp-examples`` (an eighth of the
    budget, whole base batches). Settings checked by :func:`gradkit.train.validate.check_batch_schedule`."""
    step_examples = cfg.batch_size * cfg.grad_accum
    if cfg.examples is not None:
        cfg = dataclasses.replace(cfg, steps=cfg.examples // step_examples)
    if cfg.batch_schedule == "fixed":
        return cfg
    if cfg.batch_max is None:
        cfg = dataclasses.replace(cfg, batch_max=default_batch_max(step_examples, train_rows))
    if cfg.batch_schedule == "ramp" and cfg.batch_ramp_examples is None:
        cfg = dataclasses.replace(cfg, batch_ramp_examples=max(1, cfg.steps // 8) * step_examples)
    return cfg


class GrowingBatch:
    """The batch schedule of one run. After each step :meth:`after_step` feeds the schedule and, when
    the batch grew, resizes ``batches`` from the next step on; :meth:`before_step` cuts the last
    step to the budget left. With ``noise`` it is also the method's gradient monitor
    (:attr:`gradkit.train.methods.Method.gradient_monitor`): each step's micro-batch gradients feed a
    :class:`~gradkit.scaling.NoiseScale` (:meth:`micro_step`, :meth:`step`). Its micro-batches are
    consecutive examples of the shuffled stream, not length-sorted parts: the estimator compares random
    subsets of the batch with the whole."""

    def __init__(self, cfg: TrainConfig, batches: StepBatches, processes: int):
        self.base = cfg.batch_size * cfg.grad_accum
        self.steps, self.warmup_ratio, self.lr_schedule = cfg.steps, cfg.warmup_ratio, cfg.schedule
        self.schedule = BatchSchedule(
            self.base,
            cfg.batch_schedule,
            max_batch=cfg.batch_max,
            check_every=cfg.batch_check,
            noise_fraction=cfg.batch_noise_fraction,
            ramp_examples=cfg.batch_ramp_examples,
            law="adam",  # every backprop method of the harness steps with AdamW
        )
        self.batches, self.processes = batches, processes
        self.used = 0  # base batches trained on so far
        self.noise = NoiseScale(beta=NOISE_BETA) if cfg.batch_schedule == "noise" else None
        self.recorder: Any = None
        # one process needs two micro-batches for two batch sizes; several compare each rank's with all
        self.min_parts = 2 if processes == 1 else 1

    def attach(self, model: torch.nn.Module) -> None:
        """Start reading ``model``'s gradients (after DDP or FSDP2 has wrapped it)."""
        if self.noise is not None:
            self.recorder = self.noise.accumulation_hooks(model)

    def detach(self) -> None:
        """Take the gradient hooks off (idempotent)."""
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None

    def micro_step(self, examples: int) -> None:
        """After one micro-batch's backward (``examples`` on this process): read its gradient."""
        self.recorder.micro_step(examples)

    def step(self) -> None:
        """After the step's last backward, before clipping: update the noise scale."""
        self.recorder.step()

    @property
    def done(self) -> bool:
        """Whether the budget is spent."""
        return self.used >= self.steps

    def lr_multiplier(self) -> float:
        """The factor on each group's peak lr for the next step (the LambdaLR's lambda)."""
        return (
            lr_fraction(self.used, self.steps, self.warmup_ratio, self.lr_schedule) * self.schedule.lr_factor
        )

    def before_step(self, step: int) -> None:
        """The last step takes only the base batches left in the budget."""
        if self.used + self.schedule.multiple > self.steps:
            self.batches.resize(step, (self.steps - self.used) * self.base)

    def after_step(self, step: int) -> None:
        """Count the step's base batches and let the schedule decide the next batch."""
        self.used += self.batches.span(step)[1] // self.base
        b_simple = self.noise.b_simple if self.noise is not None else None
        if self.schedule.update(step, self.used * self.base, b_simple):
            self.batches.resize(step + 1, self.schedule.batch_size)

    def metrics(self, step: int) -> dict[str, Any]:
        """The batch of step ``step`` (and the noise scale's smoothed estimates) for its metrics row."""
        row: dict[str, Any] = {"batch_size": self.batches.span(step)[1]}
        if self.noise is not None:
            row.update(self.noise.metrics())
        return row

    def summary(self) -> dict[str, Any]:
        """The schedule's record for summary.json: every growth, and the noise scale at the end."""
        out: dict[str, Any] = {
            "mode": self.schedule.mode,
            "base_batch": self.base,
            "max_batch": self.schedule.max_multiple * self.base,
            "final_batch": self.schedule.batch_size,
            "lr_factor": self.schedule.lr_factor,
            "changes": self.schedule.changes,
        }
        if self.noise is not None:
            out["b_simple"] = self.noise.b_simple
        return out

    def state_dict(self) -> dict[str, Any]:
        """The base batches used, the schedule's state and the noise scale's (plain data)."""
        return {
            "used": self.used,
            "schedule": self.schedule.state_dict(),
            "noise": self.noise.state_dict() if self.noise is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and the step batches' sizes it implies."""
        self.used = int(state["used"])
        self.schedule.load_state_dict(state["schedule"])
        if self.noise is not None:
            self.noise.load_state_dict(state["noise"])
        for change in self.schedule.changes:
            self.batches.resize(int(change["step"]) + 1, int(change["batch"]))
