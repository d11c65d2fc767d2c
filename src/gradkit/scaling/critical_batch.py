"""The critical batch size measured directly: branch short runs at several batch sizes from one
checkpoint and count the steps each needs to a target loss (Merrill et al. 2025, "Critical Batch Size
Revisited", arXiv 2505.23971), then apply Zhang et al.'s rule (2024, "How Does Critical Batch Size
Scale in Pre-training?", arXiv 2410.21676): the critical batch is where the steps to the target exceed
linear scaling by 20%.

With ``S(B)`` the steps at batch ``B`` and ``B_0`` the measured batch that needed the fewest examples,
linear scaling from ``B_0`` predicts ``S_0 · B_0 / B`` steps, so the overhead at ``B`` is the ratio of
examples

    r(B) = S(B) · B / (S_0 · B_0),

1 while doubling the batch halves the steps, growing past it. The critical batch is the first ``B``
above ``B_0`` where ``r(B) = 1 + tolerance``, read by linear interpolation in ``B`` between the last
measured size below and the first above. ``B_0`` is usually the smallest size; it is not when the
smallest batches need more examples than larger ones, as they do when branches share one learning
rate law and the smallest batch's noise floor at its lr sits near the target. Under McCandlish et al.'s trade-off ``S(B) = S_min + E_min / B`` the ratio is
linear in ``B``, ``r(B) = (S_min B + E_min) / (S_min B_0 + E_min)``, so the interpolation is exact there:
``B_crit = ((1 + tolerance)(S_min B_0 + E_min) − E_min) / S_min``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from gradkit.errors import GradkitError

__all__ = ["CriticalBatch", "branch_cbs", "critical_batch_size", "steps_to_target"]

TOLERANCE = 0.2  # Zhang et al.'s 20% overhead over linear scaling


@dataclass(frozen=True)
class CriticalBatch:
    """The measured critical batch.

    ``value``: the interpolated critical batch, or None where the measurement only brackets it:
    ``low <= B_crit < high`` (``high`` None: no size exceeded the overhead, so it lies beyond the
    largest; a finite ``high`` without a value: that size's branch did not reach the target). Per size,
    smallest first: ``batches``, ``steps`` (None: not reached in the branch's budget, counted as past
    the overhead) and ``overhead``, ``r(B)``."""

    value: float | None
    low: int
    high: int | None
    batches: tuple[int, ...]
    steps: tuple[float | None, ...]
    overhead: tuple[float, ...]
    tolerance: float

    def describe(self) -> str:
        """``B_crit ≈ 180``, ``64 <= B_crit < 128`` or ``B_crit >= 1024``."""
        if self.value is not None:
            return f"B_crit ≈ {self.value:.4g}"
        if self.high is None:
            return f"B_crit >= {self.low}"
        return f"{self.low} <= B_crit < {self.high}"


def critical_batch_size(
    batches: Sequence[int], steps: Sequence[float | None], *, tolerance: float = TOLERANCE
) -> CriticalBatch:
    """Zhang et al.'s critical batch from the steps to one target at each batch size (see the module
    docstring): above the most example-efficient size ``B_0``, the ``B`` where ``r(B) = S(B)·B /
    (S_0·B_0)`` first exceeds ``1 + tolerance``. A size whose run did not reach the target (``None``)
    counts as past it; at least one size must reach it."""
    if len(batches) != len(steps) or len(batches) < 2:
        raise GradkitError("pass at least two batch sizes and the steps to the target at each")
    if not tolerance > 0:
        raise GradkitError(f"tolerance must be > 0, got {tolerance}; Zhang et al. use 0.2")
    order = sorted(range(len(batches)), key=lambda i: batches[i])
    sizes = [int(batches[i]) for i in order]
    counts = [steps[i] for i in order]
    if len(set(sizes)) != len(sizes) or sizes[0] < 1:
        raise GradkitError(f"batch sizes must be distinct positive integers, got {sizes}")
    if any(s is not None and not s > 0 for s in counts):
        raise GradkitError(f"steps to the target must be > 0 (or None: not reached), got {counts}")
    if all(s is None for s in counts):
        raise GradkitError(
            "no batch size reached the target; lower the target or give the branches more steps"
        )
    examples = [math.inf if s is None else s * b for s, b in zip(counts, sizes, strict=True)]
    start = min(range(len(sizes)), key=examples.__getitem__)  # B_0: the fewest examples
    overhead = [e / examples[start] for e in examples]
    limit = 1.0 + tolerance
    past = next((i for i in range(start + 1, len(sizes)) if overhead[i] > limit), None)
    if past is None:  # linear scaling holds up to the largest size
        value, low, high = None, sizes[-1], None
    elif math.isinf(overhead[past]):  # not reached: somewhere between the two sizes
        value, low, high = None, sizes[past - 1], sizes[past]
    else:  # r(B_0) = 1 < 1 + tolerance and r stays below the limit up to past - 1: a bracket
        lo, hi = overhead[past - 1], overhead[past]
        value = sizes[past - 1] + (limit - lo) * (sizes[past] - sizes[past - 1]) / (hi - lo)
        low, high = sizes[past - 1], sizes[past]
    return CriticalBatch(value, low, high, tuple(sizes), tuple(counts), tuple(overhead), tolerance)


def steps_to_target(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """The first step where the loss curve ``[(step, loss), ...]`` (evaluations in step order) reaches
    ``target``: linear interpolation between the evaluation before and the one that reached it, rounded
    up to a whole step (a run takes whole steps: a target crossed before the first evaluation took at
    least one); None when no evaluation did. A curve that starts at or below the target reaches it at
    its first point."""
    if curve and curve[0][1] <= target:
        return float(curve[0][0])
    for (s0, l0), (s1, l1) in zip(curve, curve[1:], strict=False):
        if l1 <= target:  # l0 > target: the curve was above it until here
            return float(math.ceil(s0 + (s1 - s0) * (l0 - target) / (l0 - l1) - 1e-9))
    return None


def branch_cbs(
    run_branch: Callable[[int], float | None],
    batches: Sequence[int],
    *,
    tolerance: float = TOLERANCE,
    progress: bool = True,
) -> CriticalBatch:
    """Measure the critical batch at one checkpoint: ``run_branch(B)`` restores the checkpoint, trains
    at batch ``B`` (at its lr: from the optimiser's law or a small grid) and returns the steps it took
    to reach the target loss (interpolated between evaluations), or None when it did not within its
    budget; then :func:`critical_batch_size`. The branches run smallest first."""
    sizes = sorted(int(b) for b in batches)
    steps = []
    for size in tqdm(sizes, desc="branches", disable=not progress):
        steps.append(run_branch(size))
    return critical_batch_size(sizes, steps, tolerance=tolerance)
