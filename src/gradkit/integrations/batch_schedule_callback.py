"""A batch schedule beside a Hugging Face ``Trainer``: ``trainer.add_callback(BatchScheduleCallback())``.

It measures the noise scale as :class:`~gradkit.integrations.noise_scale_callback.NoiseScaleCallback`
does, and runs a :class:`gradkit.BatchSchedule` on it. The base batch is the Trainer's step batch,
``per_device_train_batch_size × gradient_accumulation_steps × processes``. When the schedule grows, the
callback records the batch, the ``gradient_accumulation_steps`` that give it and the learning rate
Adam's (or SGD's) law asks for.

It records this advice and does not apply it, because the Trainer cannot take it mid-run.
``Trainer.train`` reads ``gradient_accumulation_steps`` once, when it starts: the epoch length, the
optimiser steps, ``max_steps``, the learning-rate schedule and accelerate's gradient-sync cadence all
derive from it. Changing it mid-run would desynchronise them.

So each growth is logged: a warning naming the new ``gradient_accumulation_steps`` and learning rate,
and ``batch_schedule/*`` values in the Trainer's logs. Every growth is also kept in
:attr:`BatchScheduleCallback.recommendations` and written to ``<output_dir>/batch_schedule.json`` at
the end. To apply one, resume from a checkpoint with those arguments. gradkit's own harness does apply
it: ``gradkit finetune --batch-schedule noise``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from gradkit.files import atomic_path, write_json
from gradkit.integrations.noise_scale_callback import NoiseScaleCallback
from gradkit.scaling.batch_schedule import BatchSchedule

__all__ = ["BatchScheduleCallback"]

STATE_FILE = "batch_schedule_state.json"
ADVICE_FILE = "batch_schedule.json"
logger = logging.getLogger(__name__)


class BatchScheduleCallback(NoiseScaleCallback):
    """Measure ``B_simple`` and advise the batch of a :class:`gradkit.BatchSchedule` (module docstring).

    Args:
        mode: ``"noise"`` or ``"ramp"`` (see :class:`gradkit.BatchSchedule`).
        check_every: ``noise``: optimiser steps between decisions.
        noise_fraction: ``noise``: the batch aimed at as a fraction of ``B_simple``.
        max_batch: the largest batch advised (default 64 step batches).
        ramp_examples: ``ramp``: examples between doublings.
        law: ``"adam"`` or ``"sgd"``, the learning-rate law of the Trainer's optimiser.
        beta: the noise scale's EMA coefficient.
    """

    def __init__(
        self,
        mode: str = "noise",
        *,
        check_every: int = 50,
        noise_fraction: float = 1.0,
        max_batch: int | None = None,
        ramp_examples: int | None = None,
        law: str = "adam",
        beta: float = 0.95,
    ) -> None:
        super().__init__(beta, write_history=False)
        self.options = {
            "mode": mode,
            "check_every": check_every,
            "noise_fraction": noise_fraction,
            "ramp_examples": ramp_examples,
            "law": law,
        }
        self.max_batch = max_batch
        BatchSchedule(1, max_batch=max_batch, **self.options)  # every option checked now, not at train time
        self.schedule: BatchSchedule | None = None
        self.recommendations: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        base = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.base, self.accumulation = base, args.gradient_accumulation_steps
        self.schedule = BatchSchedule(base, max_batch=self.max_batch, **self.options)
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if state.global_step > 0 and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            self.schedule.load_state_dict(saved["schedule"])
            self.recommendations = saved["recommendations"]

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        step = state.global_step
        if not self.schedule.update(step, step * self.base, self.gns.b_simple):
            return
        advice = {
            "step": step,
            "batch": self.schedule.batch_size,
            "gradient_accumulation_steps": self.schedule.multiple * self.accumulation,
            "learning_rate": args.learning_rate * self.schedule.lr_factor,
            "lr_factor": self.schedule.lr_factor,
            "b_simple": self.gns.b_simple,
        }
        self.recommendations.append(advice)
        if state.is_world_process_zero:
            logger.warning(
                "gradkit BatchScheduleCallback: at step %d the schedule asks for a batch of %d "
                "(gradient_accumulation_steps=%d, learning_rate=%.4g); the Trainer fixes both when train() "
                "starts, so resume from a checkpoint with them to apply it",
                step,
                advice["batch"],
                advice["gradient_accumulation_steps"],
                advice["learning_rate"],
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if logs is not None and self.schedule is not None:
            logs["batch_schedule/advised_batch"] = self.schedule.batch_size
            logs["batch_schedule/advised_lr_factor"] = self.schedule.lr_factor

    def on_save(self, args, state, control, **kwargs):
        super().on_save(args, state, control, **kwargs)
        if self.schedule is not None and state.is_world_process_zero:
            write_json(
                os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE),
                {"schedule": self.schedule.state_dict(), "recommendations": self.recommendations},
            )

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with atomic_path(os.path.join(args.output_dir, ADVICE_FILE)) as tmp:
                tmp.write_text(
                    json.dumps({"base_batch": self.base, "growths": self.recommendations}, indent=2)
                )
