"""Batch size as an action: a schedule that grows the batch while training, and the learning-rate factor
that goes with each batch.

The batch is always a whole multiple ``k`` of the base batch ``B_0`` (a larger batch is ``k``
micro-batches of ``B_0``, so memory stays that of ``B_0``), and it never shrinks. Modes:

- ``fixed``: ``k = 1`` throughout.
- ``noise``: every ``check_every`` optimiser steps, ``k ← max(k, min(k_max, round(f · B_simple / B_0)))``
  with ``B_simple`` the smoothed simple noise scale (:class:`gradkit.scaling.NoiseScale`) and ``f`` the
  noise fraction. McCandlish et al. (2018, arXiv 1812.06162) find the critical batch near ``B_noise``,
  which ``B_simple`` tracks within an order of magnitude; Merrill et al. (2025, arXiv 2505.23971) measure
  the critical batch near zero at initialisation, rising fast and then flat, which is the shape this
  follows as ``B_simple`` grows.
- ``ramp``: a fixed batch-size warmup, in the spirit of Merrill et al.'s: ``k`` doubles each time the
  examples seen pass another ``ramp_examples`` (``k = 2^⌊E / E_ramp⌋``, capped at ``k_max``), with no
  measurement.

When the batch grows from ``B`` to ``B'``, the learning rate follows the law of the optimiser in use
(:func:`gradkit.scaling.laws.lr_for_batch`, with the ``B_simple`` of that moment): SGD's
``(1 + B_noise/B)/(1 + B_noise/B')`` (McCandlish et al.), or Adam's sign-descent form, whose optimal lr
peaks near ``B_noise`` and then falls (the surge; Li et al. 2024), with ``κ = √B_simple``. The schedule
keeps the product of these factors, :attr:`BatchSchedule.lr_factor`, to multiply the base learning rate
(and whatever warmup or decay schedule it has). ``ramp`` has no measurement to feed a law: its factor
stays 1 unless ``B_simple`` is given to :meth:`update`.
"""

from __future__ import annotations

import math
from typing import Any

from gradkit.errors import GradkitError
from gradkit.scaling.laws import lr_for_batch

__all__ = ["BATCH_SCHEDULES", "BatchSchedule", "noise_multiple", "ramp_multiple"]

BATCH_SCHEDULES = ("fixed", "noise", "ramp")
LAWS = ("sgd", "adam")


def noise_multiple(b_simple: float, base_batch: int, fraction: float, max_multiple: int) -> int:
    """``min(k_max, max(1, round(f · B_simple / B_0)))``: the multiple of the base batch the measured
    noise scale asks for (at least 1)."""
    return min(max_multiple, max(1, round(fraction * b_simple / base_batch)))


def ramp_multiple(examples: int, ramp_examples: int, max_multiple: int) -> int:
    """``min(k_max, 2^⌊E / E_ramp⌋)``: the fixed warmup's multiple after ``examples`` examples."""
    doublings = min(examples // ramp_examples, max_multiple.bit_length())  # more would pass the cap anyway
    return min(max_multiple, 2**doublings)


class BatchSchedule:
    """The batch size of each optimiser step, and its learning-rate factor (see the module docstring).

    Args:
        base_batch: ``B_0``, the batch of step 1; every batch is a multiple of it.
        mode: ``"fixed"``, ``"noise"`` or ``"ramp"``.
        max_batch: the cap (a multiple of ``base_batch``; default ``64 · base_batch``).
        check_every: ``noise``: optimiser steps between decisions.
        noise_fraction: ``noise``: ``f`` in ``f · B_simple``.
        ramp_examples: ``ramp``: examples between doublings.
        law: ``"sgd"`` or ``"adam"``: the learning-rate law of the optimiser in use.

    Use: after each optimiser step call ``schedule.update(step, examples_seen, b_simple)``; the next
    step uses ``schedule.batch_size`` examples (``schedule.multiple`` micro-batches of the base batch)
    at ``base_lr · schedule.lr_factor``. ``state_dict`` / ``load_state_dict`` resume it exactly.
    """

    def __init__(
        self,
        base_batch: int,
        mode: str = "noise",
        *,
        max_batch: int | None = None,
        check_every: int = 50,
        noise_fraction: float = 1.0,
        ramp_examples: int | None = None,
        law: str = "adam",
    ) -> None:
        max_batch = 64 * base_batch if max_batch is None else max_batch
        _check(base_batch, mode, max_batch, check_every, noise_fraction, ramp_examples, law)
        self.base_batch, self.mode, self.law = base_batch, mode, law
        self.max_multiple = max_batch // base_batch
        self.check_every, self.noise_fraction, self.ramp_examples = check_every, noise_fraction, ramp_examples
        self.multiple = 1
        self.lr_factor = 1.0
        self.changes: list[dict[str, Any]] = []  # every growth: step, examples, batch, lr_factor, b_simple

    @property
    def batch_size(self) -> int:
        """The batch of the next optimiser step: ``multiple · base_batch``."""
        return self.multiple * self.base_batch

    def update(self, step: int, examples: int, b_simple: float | None = None) -> bool:
        """After optimiser step ``step`` (examples seen so far: ``examples``), decide the next batch;
        True when it grew. ``b_simple``: the smoothed noise scale now (None while not measurable)."""
        if self.mode == "noise":
            if step % self.check_every or b_simple is None or not b_simple > 0:
                return False
            wanted = noise_multiple(b_simple, self.base_batch, self.noise_fraction, self.max_multiple)
        elif self.mode == "ramp":
            wanted = ramp_multiple(examples, self.ramp_examples, self.max_multiple)  # type: ignore[arg-type]
        else:
            return False
        if wanted <= self.multiple:  # never shrink
            return False
        old = self.batch_size
        self.multiple = wanted
        if b_simple is not None and b_simple > 0:
            self.lr_factor *= self.lr_ratio(old, self.batch_size, b_simple)
        self.changes.append(
            {
                "step": step,
                "examples": examples,
                "batch": self.batch_size,
                "lr_factor": self.lr_factor,
                "b_simple": b_simple,
            }
        )
        return True

    def lr_ratio(self, batch: int, new_batch: int, b_simple: float) -> float:
        """``lr(B') / lr(B)`` by the schedule's law at noise scale ``b_simple``."""
        if self.law == "sgd":
            return lr_for_batch(1.0, batch, new_batch, optimizer="sgd", b_noise=b_simple)
        return lr_for_batch(
            1.0, batch, new_batch, optimizer="adam", kappa=math.sqrt(b_simple), b_noise=b_simple
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "multiple": self.multiple,
            "lr_factor": self.lr_factor,
            "changes": [dict(c) for c in self.changes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multiple = int(state["multiple"])
        self.lr_factor = float(state["lr_factor"])
        self.changes = [dict(c) for c in state["changes"]]

    def __repr__(self) -> str:
        return f"BatchSchedule(mode={self.mode!r}, batch={self.batch_size}, lr_factor={self.lr_factor:.4g})"


def _check(
    base_batch: int,
    mode: str,
    max_batch: int,
    check_every: int,
    noise_fraction: float,
    ramp_examples: int | None,
    law: str,
) -> None:
    """Every argument in its range, one clear error each."""
    if mode not in BATCH_SCHEDULES:
        raise GradkitError(f"unknown batch schedule {mode!r}; choose one of: {', '.join(BATCH_SCHEDULES)}")
    if law not in LAWS:
        raise GradkitError(f"unknown learning-rate law {law!r}; choose one of: {', '.join(LAWS)}")
    if not (isinstance(base_batch, int) and base_batch >= 1):
        raise GradkitError(f"base_batch must be a positive integer, got {base_batch!r}")
    if not (isinstance(max_batch, int) and max_batch >= base_batch and max_batch % base_batch == 0):
        raise GradkitError(
            f"max_batch {max_batch!r} must be a multiple of base_batch {base_batch} and at least it; "
            f"pass e.g. max_batch={8 * base_batch}"
        )
    if not (isinstance(check_every, int) and check_every >= 1):
        raise GradkitError(f"check_every must be an integer >= 1, got {check_every!r}")
    if not (math.isfinite(noise_fraction) and noise_fraction > 0):
        raise GradkitError(f"noise_fraction must be > 0, got {noise_fraction!r}; pass e.g. 1.0")
    if mode == "ramp" and not (isinstance(ramp_examples, int) and ramp_examples >= 1):
        raise GradkitError(
            f"the ramp schedule needs ramp_examples, the examples between doublings (>= 1), got {ramp_examples!r}"
        )
