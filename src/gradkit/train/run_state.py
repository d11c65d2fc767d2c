"""The loop's own resumable state: what a run has done so far, carried from step to step and written
into every checkpoint (``state.pt``) beside the optimiser's, the scheduler's and the EMA's own state.

Everything here is plain data (numbers, lists, dicts), so a checkpoint loads with
``torch.load(weights_only=True)``; the data position is ``step`` (the training stream is a fixed
function of the seed) and, with a growing batch, the batch sizes in ``batch_growth``, so nothing else
about the data needs saving.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    """What a run has done, up to and including ``step``.

    ``losses`` holds the train loss of every step that produced a finite one, ``loss_steps`` the step
    of each (a step the optimiser skipped has none); ``dev_curve`` the ``[step, dev loss]`` pairs of
    the dev evaluations; ``best`` the dev metrics of the best dev score so far (``--keep-best``);
    ``start_metrics`` the test metrics at step 0 and after the head warm-up; ``warmup_losses`` the head
    warm-up's per-step losses; ``skipped`` the steps the optimiser skipped; ``train_seconds`` the time
    spent training up to the last checkpoint, over every session; ``num_processes`` the processes the
    run trains with (a resumed run must use as many: each one's random state is its own);
    ``batch_growth`` a growing batch's state (:class:`gradkit.train.batch_growth.GrowingBatch`)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    loss_steps: list[int] = field(default_factory=list)
    dev_curve: list[list[float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    start_metrics: dict[str, Any] = field(default_factory=dict)
    warmup_losses: list[float] = field(default_factory=list)
    skipped: int = 0
    train_seconds: float = 0.0
    num_processes: int = 1
    batch_growth: dict[str, Any] = field(default_factory=dict)

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields as a plain dict, every field by its name (the form ``state.pt`` holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> RunState:
        """The state :meth:`to_checkpoint` wrote; keys of the checkpoint that are not fields (the
        optimiser's, the scheduler's and the EMA's state) are left to their owners."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})
